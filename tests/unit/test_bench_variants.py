"""P1/P3's chain of fork variants (bench/fork_bench.py): each variant meets the huge pages
its name says, because of the fork before it on the same guest."""

from __future__ import annotations

import pytest

from bench import report
from bench.fork_bench import BG, VARIANTS, fork_order, interleaved, named_now, paired_ratios

#: the variant each one must follow (stop-and-copy ignored: it leaves the pages as they are):
#: "on" = a fork with collapse_huge_pages (pages left whole), "off-bg" = a background fork
#: without it (pages left split)
MUST_FOLLOW = {"bg-first": "off-bg", "bg-intact": "on", "bg-fresh": "on", "bg-split": "off-bg"}


def kind(variant: str) -> str:
    method, collapse = VARIANTS[variant]
    if collapse:
        return "on"
    return "off-bg" if method == BG else "sc"


def broken_links(order: list[tuple[int, str]]) -> list[str]:
    """The measured forks (rep >= 0) that do not follow what they must; the warm-up (rep -1)
    is not measured but counts as the fork before."""
    links, previous = [], None
    for index, (rep, variant) in enumerate(order):
        wanted = MUST_FOLLOW.get(variant)
        if rep >= 0 and wanted and (previous is None or kind(previous) != wanted):
            links.append(f"#{index} {variant} after {previous}")
        if kind(variant) != "sc":
            previous = variant
    return links


@pytest.mark.parametrize("reps", [1, 2, 3, 6])
def test_every_variant_follows_the_fork_that_makes_its_huge_pages(reps):
    order = fork_order(reps, warmup=True)
    assert order[0] == (-1, "bg-split")  # the warm-up: an "off" background fork
    assert broken_links(order) == []


def test_each_build_gets_the_whole_chain_on_its_own_guest():
    order = interleaved(fork_order(4, warmup=True), ["7.2", "10.0"])
    for build in ("7.2", "10.0"):
        mine = [(rep, variant) for rep, variant, on in order if on == build]
        assert mine == fork_order(4, warmup=True)
        assert broken_links(mine) == []


def test_every_repetition_has_each_variant_once_and_stop_and_copy_at_either_end():
    order = fork_order(4, warmup=True)
    for rep in range(4):
        variants = [v for r, v in order if r == rep]
        assert sorted(variants) == sorted(VARIANTS)
        assert variants[0 if rep % 2 == 0 else -1] == "sc"


def test_the_checker_catches_the_old_order():
    """The order before kvmsnap rebuilt the pages after the snapshot: bg-split right after
    an "on" fork, which now leaves them whole, and bg-intact after split pages (bg-first)."""
    old = [(-1, "bg-intact"), (0, "bg-intact"), (0, "bg-split"), (0, "sc"), (1, "sc"),
           (1, "bg-intact"), (1, "bg-split")]
    assert broken_links(old) == ["#2 bg-split after bg-intact", "#5 bg-intact after bg-split",
                                 "#6 bg-split after bg-intact"]


def test_without_a_warm_up_only_the_first_fork_meets_what_the_boot_left():
    assert broken_links(fork_order(3, warmup=False)) == ["#1 bg-first after None"]


def test_the_report_knows_every_variant():
    assert set(report.VARIANTS) == set(VARIANTS)
    for table in (report.LABEL, report.SHORT, report.COLOUR):
        assert set(table) == set(VARIANTS)
    assert set(report.BACKGROUND) == {v for v, (method, _) in VARIANTS.items() if method == BG}
    assert len(set(report.COLOUR.values())) == len(VARIANTS)


def record(variant: str, rep: int, pause_ms: float, **more: object) -> dict[str, object]:
    return {"ram_mib": 256, "rep": rep, "variant": variant, "pause_ms": pause_ms, **more}


def test_old_results_bg_intact_is_bg_first_now():
    """Before the five variants (no collapse_after), bg-intact followed split pages."""
    old = [record("bg-intact", 0, 40.0), record("bg-split", 0, 160.0)]
    new = [record("bg-intact", 0, 10.0, collapse_after=None)]
    assert [r["variant"] for r in named_now(old + new)] == ["bg-first", "bg-split",
                                                            "bg-intact"]
    assert old[0]["variant"] == "bg-intact"  # a view: the records stay as measured


def test_ratios_leave_out_the_pairs_a_result_set_does_not_have():
    good = named_now([record("bg-intact", 0, 40.0), record("bg-split", 0, 160.0)])
    ratios = paired_ratios(good)
    assert [e["ratio"] for e in ratios] == ["bg-split/bg-first"]
    assert ratios[0]["pause_ms"]["median"] == 4.0
