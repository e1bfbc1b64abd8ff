"""P6's order, ratios and table (bench/backing_bench.py), from made-up records."""

from __future__ import annotations

from bench import backing_bench
from bench.backing_bench import BACKINGS, backing_args, fork_order, markdown, summarise


def test_thp_is_qemus_default_and_hugetlb_a_preallocated_memfd_of_the_guest_size():
    assert backing_args("thp", 1024) == ()
    args = backing_args("hugetlb", 1024)
    assert "memory-backend-memfd,id=ram0,size=1024M,hugetlb=on,hugetlbsize=2M,prealloc=on" \
        in args and args[-2:] == ("-machine", "memory-backend=ram0")


def test_each_repetition_forks_both_and_the_first_alternates():
    order = fork_order(4, warmup=True)
    assert order[:2] == [(-1, "thp"), (-1, "hugetlb")]
    firsts = [backing for rep, backing in order[2::2]]
    assert firsts == ["thp", "hugetlb", "thp", "hugetlb"]
    for rep in range(4):
        assert sorted(b for r, b in order if r == rep) == sorted(BACKINGS)


def record(rep: int, backing: str, pause: float, **extra) -> dict:
    figures = {key: 1.0 for key in backing_bench.FIGURES}
    return {"qemu": "7.2", "ram_mib": 1024, "rep": rep, "warmup": rep < 0,
            "backing": backing, **figures, "pause_ms": pause, **extra}


def test_ratios_pair_the_two_forks_of_a_repetition_and_leave_out_warm_ups_and_failures():
    records = [record(-1, "thp", 99.0), record(-1, "hugetlb", 1.0),
               record(0, "thp", 40.0), record(0, "hugetlb", 10.0),
               record(1, "hugetlb", 12.0), record(1, "thp", 30.0),
               record(2, "thp", 50.0), {**record(2, "hugetlb", 1.0), "error": "boom"}]
    rows = summarise(records)["rows"]
    assert [r["backing"] for r in rows] == ["thp", "hugetlb", "hugetlb / thp"]
    thp, huge, ratio = rows
    assert thp["n"] == 3 and thp["pause_ms"]["median"] == 40.0
    assert huge["n"] == 2 and huge["pause_ms"]["median"] == 11.0
    assert ratio["pause_ms"]["n"] == 2 and ratio["pause_ms"]["median"] == (0.25 + 0.4) / 2


def test_the_table_has_a_row_per_backing_and_one_of_ratios_all_the_same_width():
    records = [record(0, "thp", 40.0), record(0, "hugetlb", 10.0)]
    section = {"records": records, "summary": summarise(records), "qemu": {"7.2": "7.2.22"}}
    table = [line for line in markdown(section) if line.startswith("| 7.2.22")]
    assert len(table) == 3 and table[2].startswith("| 7.2.22 | 1 GiB | hugetlb / thp | 0.25x")
    header = next(line for line in markdown(section) if line.startswith("| QEMU"))
    assert {line.count("|") for line in table} == {header.count("|")}
    assert "populate_read_range" in "\n".join(markdown(section))  # the why, from the docstring
