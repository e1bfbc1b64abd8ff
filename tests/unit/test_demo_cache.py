"""The cache the demo and the tests build into: whole builds or nothing, built once."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from kvmsnap_demo.cache import build_once
from kvmsnap_plugin.errors import HostError


def make(calls: list[Path], *, done: bool = True, fail: bool = False):
    def build(staging: Path) -> None:
        calls.append(staging)
        (staging / "image").write_text("bytes")
        if fail:
            raise RuntimeError("the build broke")
        if done:
            (staging / "done").write_text("")
    return build


def test_a_build_lands_whole_readable_by_all_and_only_once(tmp_path):
    calls: list[Path] = []
    final = tmp_path / "thing-abc"
    assert build_once(final, "done", make(calls), lock=tmp_path / ".lock") == final
    assert (final / "image").read_text() == "bytes"
    assert stat.S_IMODE(final.stat().st_mode) == 0o755
    assert build_once(final, "done", make(calls), lock=tmp_path / ".lock") == final
    assert len(calls) == 1 and calls[0].parent == tmp_path and calls[0] != final
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "thing-abc"]


def test_a_failed_build_leaves_nothing_and_the_next_one_builds(tmp_path):
    calls: list[Path] = []
    final = tmp_path / "thing-abc"
    with pytest.raises(RuntimeError, match="the build broke"):
        build_once(final, "done", make(calls, fail=True), lock=tmp_path / ".lock")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    build_once(final, "done", make(calls), lock=tmp_path / ".lock")
    assert (final / "done").exists() and len(calls) == 2


def test_a_build_that_forgets_its_marker_is_an_error_not_a_cache_entry(tmp_path):
    final = tmp_path / "thing-abc"
    with pytest.raises(HostError, match="did not write done"):
        build_once(final, "done", make([], done=False), lock=tmp_path / ".lock")
    assert not final.exists()


def test_a_half_build_in_the_final_place_is_replaced(tmp_path):
    final = tmp_path / "thing-abc"
    final.mkdir()
    (final / "image").write_text("half")
    build_once(final, "done", make([]), lock=tmp_path / ".lock")
    assert (final / "image").read_text() == "bytes"


def test_staging_dirs_a_killed_build_left_go_with_the_next_build(tmp_path):
    stale = tmp_path / ".thing-abc-k1ll3d_0"
    stale.mkdir()
    (stale / "image").write_text("half")
    other = tmp_path / ".thing-abcd-1"  # another entry's name: not ours to remove
    other.mkdir()
    build_once(tmp_path / "thing-abc", "done", make([]), lock=tmp_path / ".lock")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", ".thing-abcd-1",
                                                          "thing-abc"]
