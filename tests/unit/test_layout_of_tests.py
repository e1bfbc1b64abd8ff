"""pytest imports test files by their base name (no packages here): a unit test and an
integration test of one name would stop the whole run at collection."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_no_two_test_files_share_a_name():
    names = [p.name for p in TESTS.rglob("*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
