"""Every partition classified (disks/classify.py) and the exit-code policy (issue #14)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmsnap_plugin.config import fork_options
from kvmsnap_plugin.disks import classify
from kvmsnap_plugin.errors import UsageError
from kvmsnap_plugin.model import (
    BackupReport,
    ExposedFilesystem,
    FsState,
    Label,
    Outcome,
    PartKind,
    ProbeInfo,
    RamMethod,
    ShutdownResult,
    SkipRule,
    Verdict,
)
from kvmsnap_plugin.run.report import render_report, warnings_of

GPT_LINUX = "0fc63daf-8483-4772-8e3d-3d69e4de6b6f"
GPT_LVM = "e6d6d379-f507-44c2-a23c-238f2a3df928"
MOUNTABLE = ("ext4", "xfs", "vfat")


def blkid(**fields: str) -> ProbeInfo:
    return ProbeInfo.from_blkid("\n".join(f"{k}={v}" for k, v in fields.items()))


@pytest.mark.parametrize(("probed", "kind"), [
    (blkid(TYPE="ext4", PART_ENTRY_TYPE=GPT_LINUX, UUID="u1"), PartKind.FILESYSTEM),
    (blkid(TYPE="xfs"), PartKind.FILESYSTEM),  # a whole disk, no partition entry
    (blkid(TYPE="vfat", PART_ENTRY_TYPE=classify.EFI_SYSTEM_GUID.upper()),
     PartKind.EFI_SYSTEM),
    (blkid(TYPE="vfat", PART_ENTRY_TYPE="0xef"), PartKind.EFI_SYSTEM),
    (blkid(TYPE="vfat", PART_ENTRY_TYPE="0xc"), PartKind.FILESYSTEM),
    (blkid(TYPE="swap", PART_ENTRY_TYPE=GPT_LINUX), PartKind.SWAP),  # the signature wins
    (blkid(PART_ENTRY_TYPE=classify.SWAP_GUID), PartKind.SWAP),
    (blkid(PART_ENTRY_TYPE="0x82"), PartKind.SWAP),
    (blkid(PART_ENTRY_TYPE=classify.BIOS_BOOT_GUID), PartKind.BIOS_BOOT),
    (blkid(PART_ENTRY_TYPE="0x5"), PartKind.EXTENDED),
    (blkid(PART_ENTRY_TYPE="0xf"), PartKind.EXTENDED),
    (blkid(PTTYPE="dos"), PartKind.EXTENDED),
    (blkid(TYPE="LVM2_member", PART_ENTRY_TYPE=GPT_LVM), PartKind.LVM_PV),
    (blkid(TYPE="crypto_LUKS"), PartKind.LUKS),
    (ProbeInfo(part_type=GPT_LINUX, zeroed=True), PartKind.EMPTY),
    (ProbeInfo(part_type=GPT_LINUX, zeroed=False), PartKind.UNKNOWN),
])
def test_every_kind_from_what_blkid_says(probed, kind):
    assert classify.kind_of(probed) is kind


def partition(probed: ProbeInfo, where: str = "p1") -> ExposedFilesystem:
    return ExposedFilesystem("vdb", where, Path(f"/dev/loop9{where}"), probed.type, None,
                             classify.kind_of(probed), probed=probed)


@pytest.mark.parametrize(("probed", "outcome", "reason"), [
    (blkid(TYPE="ext4"), Outcome.ARCHIVED, "mounted read-only (ext4)"),
    (blkid(TYPE="swap"), Outcome.SKIPPED_BY_RULE, "swap holds no files"),
    (blkid(PART_ENTRY_TYPE=classify.BIOS_BOOT_GUID), Outcome.SKIPPED_BY_RULE, "BIOS boot"),
    (blkid(PART_ENTRY_TYPE="0x5"), Outcome.SKIPPED_BY_RULE, "extended partition"),
    (ProbeInfo(zeroed=True), Outcome.SKIPPED_BY_RULE, "empty"),
    (blkid(TYPE="LVM2_member"), Outcome.NOT_ARCHIVED, "LVM physical volume"),
    (blkid(TYPE="crypto_LUKS", UUID="0f1e"), Outcome.NOT_ARCHIVED,
     "LUKS volume 0f1e: no key (luks_keys)"),
    (blkid(TYPE="ntfs"), Outcome.NOT_ARCHIVED, "ntfs: the host kernel cannot mount it"),
    (ProbeInfo(), Outcome.NOT_ARCHIVED, "no filesystem kvmsnap recognises"),
])
def test_what_files_mode_does_with_each_kind(probed, outcome, reason):
    found, why = classify.plan_files(partition(probed), (), MOUNTABLE)
    assert found is outcome
    assert reason in why


@pytest.mark.parametrize("rule", ["label:SWAP", "uuid:ABC-1", "type:swap", "type:0x82",
                                  "where:vdb/p1"])
def test_a_skip_rule_names_a_partition_by_label_uuid_type_or_place(rule):
    swap = partition(blkid(TYPE="swap", LABEL="SWAP", UUID="abc-1", PART_ENTRY_TYPE="0x82"))
    assert SkipRule.parse(rule).matches(swap)
    assert classify.plan_files(swap, (SkipRule.parse(rule),), MOUNTABLE) == (
        Outcome.SKIPPED_BY_CONFIG, f"skip_partitions {rule}")
    other = partition(blkid(TYPE="ext4", LABEL="root", UUID="x"), "p2")
    assert not SkipRule.parse(rule).matches(other)


def test_an_lvm_pv_skipped_by_its_kind():
    pv = partition(blkid(TYPE="LVM2_member"))
    assert SkipRule.parse("type:lvm-pv").matches(pv)


@pytest.mark.parametrize("bad", ["SWAP", "name:x", "label:", ":x"])
def test_a_bad_skip_rule_is_refused_with_the_forms_it_may_take(bad):
    with pytest.raises(UsageError, match="cannot read skip rule") as refused:
        fork_options({"skip_partitions": [bad]})
    assert "label:NAME" in refused.value.hint


def test_skip_rules_flow_from_config_keys():
    options = fork_options({"skip_partitions": ["label:SWAP", "type:0x82"]})
    assert [str(r) for r in options.skip_partitions] == ["label:SWAP", "type:0x82"]
    with pytest.raises(UsageError, match="list of rules"):
        fork_options({"skip_partitions": "label:SWAP"})


# -- the exit-code policy: clean and no warning -> 0, else 1 (refusals raise: 2) -------------
def exposed(probed: ProbeInfo, outcome: Outcome, where: str = "p1") -> ExposedFilesystem:
    fs = partition(probed, where)
    return ExposedFilesystem(fs.disk, fs.partition, fs.device, fs.fstype, None, fs.kind,
                             outcome, "why", probed)


EXT4 = exposed(blkid(TYPE="ext4"), Outcome.ARCHIVED, "p4")
CLEAN = Verdict("vdb", "p4", "ext4", FsState.CLEAN, "ext4 cleanly unmounted")
SWAP = exposed(blkid(TYPE="swap"), Outcome.SKIPPED_BY_RULE, "p2")
PV = exposed(blkid(TYPE="LVM2_member"), Outcome.NOT_ARCHIVED, "p3")
PV_SKIPPED = exposed(blkid(TYPE="LVM2_member"), Outcome.SKIPPED_BY_CONFIG, "p3")
VFAT = exposed(blkid(TYPE="vfat"), Outcome.ARCHIVED, "p5")
VFAT_UNKNOWN = Verdict("vdb", "p5", "vfat", FsState.UNKNOWN, "no clean-shutdown check")


def report(partitions, verdicts, label=Label.CLEAN) -> BackupReport:
    records = classify.records(partitions, image_only=False)
    return BackupReport("vm", label, RamMethod.BACKGROUND, 1.0, 1.0, 0, 0.0, None, 0.0,
                        ShutdownResult(True, "acpi", 1.0, 1, "powered off"), verdicts, [],
                        [], [], 1.0, warnings_of(label, verdicts, [], records),
                        partitions=records)


def exit_code(rep: BackupReport) -> int:
    return 0 if rep.clean and not rep.warnings else 1  # cli.py's rule


@pytest.mark.parametrize(("partitions", "verdicts", "code", "named"), [
    ([EXT4, SWAP], [CLEAN], 0, []),  # skipped by rule: holds no files
    ([EXT4, SWAP, PV_SKIPPED], [CLEAN], 0, []),  # skipped by config: no nightly warning
    ([EXT4, PV], [CLEAN], 1, ["vdb/p3 (LVM2_member) NOT ARCHIVED: why"]),
    ([EXT4, VFAT], [CLEAN, VFAT_UNKNOWN], 1,
     ["vdb/p5 (vfat) archived but not proven clean: no clean-shutdown check"]),
])
def test_the_exit_code_policy(partitions, verdicts, code, named):
    rep = report(partitions, verdicts)
    assert exit_code(rep) == code
    assert rep.warnings == named
    assert rep.as_dict()["partitions"][0]["outcome"] == "archived"


def test_only_what_is_archived_and_holds_files_gets_a_verdict():
    files = classify.to_verdict([EXT4, SWAP, PV, PV_SKIPPED, VFAT], image_only=False)
    assert [fs.partition for fs in files] == ["p4", "p5"]
    image = classify.to_verdict([EXT4, SWAP, PV, PV_SKIPPED, VFAT], image_only=True)
    assert [fs.partition for fs in image] == ["p4", "p3", "p5"]


def test_image_mode_says_every_partition_is_in_the_image():
    records = classify.records([EXT4, SWAP, PV], image_only=True)
    assert {r.outcome for r in records} == {Outcome.IN_IMAGE}
    assert not any(r.warns for r in records)


def test_the_report_lists_every_partition_with_what_was_done():
    text = render_report(report([EXT4, SWAP, PV], [CLEAN]))
    assert "vdb/p2" in text and "skipped-by-rule" in text
    assert "vdb/p3" in text and "not-archived" in text
    assert "warning  vdb/p3 (LVM2_member) NOT ARCHIVED" in text
