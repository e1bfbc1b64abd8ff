"""The libguestfs route without an appliance: what goes to it, what it is named, what is
said when libguestfs is missing, and the LUKS key option (config and command line)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kvmsnap_plugin import cli
from kvmsnap_plugin.config import fork_options
from kvmsnap_plugin.disks import classify, guestfs_helper, guestfs_route
from kvmsnap_plugin.errors import UsageError
from kvmsnap_plugin.host import mounts
from kvmsnap_plugin.model import ExposedDisk, ExposedFilesystem, Outcome, PartKind, ProbeInfo

UUID = "4995eed2-4f82-4704-8702-9367d65deee4"


def planned(where: str, **blkid: str) -> ExposedFilesystem:
    probed = ProbeInfo.from_blkid("\n".join(f"{k}={v}" for k, v in blkid.items()))
    fs = ExposedFilesystem("vdisk1", where, Path(f"/dev/loop9{where}"), probed.type, None,
                           classify.kind_of(probed), probed=probed)
    outcome, reason = classify.plan_files(fs, (), ("ext4", "xfs", "vfat"))
    return ExposedFilesystem(fs.disk, fs.partition, fs.device, fs.fstype, None, fs.kind,
                             outcome, reason, probed)


PV = planned("p1", TYPE="LVM2_member")
LUKS = planned("p2", TYPE="crypto_LUKS", UUID=UUID)
NTFS = planned("p3", TYPE="ntfs")
SWAP = planned("p4", TYPE="swap")
EXT4 = planned("p5", TYPE="ext4")
NOTHING = planned("p6")


def test_what_goes_to_libguestfs():
    keys = {UUID: Path("/k")}
    assert [guestfs_route.helper_kind(fs, keys) for fs in (PV, LUKS, NTFS, SWAP, EXT4)] \
        == ["lvm-pv", "luks", "filesystem", None, None]
    assert guestfs_route.helper_kind(LUKS, {}) is None  # no key: stays NOT ARCHIVED
    assert guestfs_route.helper_kind(NOTHING, keys) is None  # no filesystem to mount
    assert LUKS.reason == f"LUKS volume {UUID}: no key (luks_keys)"


def disk(*filesystems: ExposedFilesystem) -> ExposedDisk:
    return ExposedDisk("vdisk1", Path("/x.raw"), Path("/dev/loop9"), filesystems)


def test_without_libguestfs_each_item_says_so_with_the_fix(tmp_path, monkeypatch):
    # the venv's Python has no guestfs binding: the helper exits 3 at once
    monkeypatch.setattr(guestfs_route, "GUESTFS_PYTHON", sys.executable)
    disks, appliance = guestfs_route.route(
        [disk(PV, LUKS, EXT4)], [("vdisk1", tmp_path / "none.qcow2", "qcow2")],
        tmp_path / "root", tmp_path, keys=[(UUID, tmp_path / "key")])
    assert appliance is None
    pv, luks, ext4 = disks[0].filesystems
    for fs in (pv, luks):
        assert fs.outcome is Outcome.NOT_ARCHIVED
        assert "libguestfs is not installed (apt-get install libguestfs-tools " \
               "python3-guestfs)" in fs.reason
    assert ext4 == EXT4
    assert not (tmp_path / "guestfs").exists()


def test_a_failing_appliance_is_a_named_reason_and_leaves_nothing(tmp_path):
    """The real helper with the real binding, given an image that does not exist: it fails
    before any appliance starts; the item says why, nothing stays mounted or running."""
    disks, appliance = guestfs_route.route(
        [disk(PV)], [("vdisk1", tmp_path / "missing.qcow2", "qcow2")], tmp_path / "root",
        tmp_path)
    assert appliance is None
    (pv,) = disks[0].filesystems
    assert pv.outcome is Outcome.NOT_ARCHIVED
    assert "libguestfs failed: RuntimeError" in pv.reason
    assert "missing.qcow2" in pv.reason
    assert not mounts.mounts_under(tmp_path)
    assert not (tmp_path / "guestfs").exists()


def test_an_interrupted_start_ends_the_helper(tmp_path, monkeypatch):
    started = []

    def interrupted(appliance, result, stderr_path):
        started.append(appliance.process)
        raise KeyboardInterrupt

    monkeypatch.setattr(guestfs_route, "_wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        guestfs_route.route([disk(PV)], [("vdisk1", tmp_path / "x.qcow2", "qcow2")],
                            tmp_path / "root", tmp_path)
    assert started[0].poll() is not None  # ended and reaped
    assert not (tmp_path / "guestfs").exists()


def test_nothing_for_libguestfs_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(guestfs_route, "GUESTFS_PYTHON", "/nonexistent/python3")
    disks, appliance = guestfs_route.route([disk(EXT4, SWAP, LUKS)], [], tmp_path / "root",
                                           tmp_path)
    assert appliance is None
    assert disks[0].filesystems == (EXT4, SWAP, LUKS)


def test_what_the_appliance_found_is_named_and_bound_under_the_mount_root(tmp_path):
    fuse = tmp_path / "guestfs"
    for name in ("m0", "m1", "m2"):
        (fuse / name).mkdir(parents=True)
        (fuse / name / f"{name}.txt").write_text(name)
    root = tmp_path / "root"
    root.mkdir()
    found = [{"where": "vdisk1/p2", "parent": "vdisk1/p2", "device": "/dev/mapper/luks-x",
              "dir": "m0", "fstype": "ext4", "head": ""},
             {"where": "vdisk1/p3", "parent": "vdisk1/p3", "device": "/dev/sda3",
              "dir": "m1", "fstype": "ntfs"},
             {"where": "vdisk1/lvm/vg0/srv", "parent": "vdisk1/p1", "device": "/dev/vg0/srv",
              "dir": "m2", "fstype": "ext4", "head": ""},
             {"where": "vdisk1/lvm/vg0/swap", "parent": "vdisk1/p1", "device": "/dev/vg0/swap",
              "fstype": "swap", "reason": "swap: nothing to mount"}]
    items = [{"where": w} for w in ("vdisk1/p1", "vdisk1/p2", "vdisk1/p3")]
    appliance = guestfs_route.Appliance(fuse, root=root)
    try:
        disks = guestfs_route._apply([disk(PV, LUKS, NTFS, EXT4)], items, found, appliance,
                                     (), None)
        by_where = {fs.where: fs for fs in disks[0].filesystems}
        assert by_where["vdisk1/p1"].outcome is Outcome.OPENED
        assert "vdisk1/lvm/vg0/srv" in by_where["vdisk1/p1"].reason
        assert (root / "vdisk1/lvm/vg0/srv/m2.txt").read_text() == "m2"
        assert (root / "vdisk1/p2/m0.txt").read_text() == "m0"
        assert (root / "vdisk1/p3/m1.txt").read_text() == "m1"
        for where in ("vdisk1/p2", "vdisk1/p3", "vdisk1/lvm/vg0/srv"):
            assert by_where[where].outcome is Outcome.ARCHIVED
            assert "through libguestfs" in by_where[where].reason
            assert by_where[where].route == "libguestfs"
        assert by_where["vdisk1/p2"].kind is PartKind.LUKS
        assert by_where["vdisk1/lvm/vg0/swap"].outcome is Outcome.SKIPPED_BY_RULE
        assert by_where["vdisk1/p5"] == EXT4
        records = classify.records(disks[0].filesystems, image_only=False)
        assert not [r for r in records if r.warns]
        verdicts = classify.to_verdict(disks[0].filesystems, image_only=False)
        assert {fs.where for fs in verdicts} == {"vdisk1/p2", "vdisk1/p3",
                                                 "vdisk1/lvm/vg0/srv", "vdisk1/p5"}
    finally:
        guestfs_route.close(appliance)
    assert not mounts.mounts_under(root)
    assert list(root.iterdir()) == []  # vdisk1/lvm/vg0 made for the binds are gone


class KernelOrderAppliance:
    """The calls of a libguestfs handle the helper makes to find logical volumes, answering
    as the appliance did for the realistic Debian guest (issue #14): the guest's second disk
    is libguestfs' /dev/sdb but the appliance kernel's /dev/sda (it probes the drives
    asynchronously), and ``pvs_full`` gives the kernel's name, untranslated."""

    PV_UUID = "6Rz15A-lAHY-Gf0o-R87v-KcKi-xk5m-v0su6U"

    def lvm_scan(self, activate):
        pass

    def pvs(self):
        return ["/dev/sdb4"]

    def pvs_full(self):
        return [{"pv_name": "/dev/sda4", "pv_uuid": self.PV_UUID.replace("-", "")}]

    def pvuuid(self, device):
        if device != "/dev/sdb4":
            raise RuntimeError(f"pvuuid: {device}: not a physical volume")
        return self.PV_UUID

    def canonical_device_name(self, device):
        return device

    def vgpvuuids(self, vg):
        return [self.PV_UUID] if vg == "kvmsnap-vg" else []

    def lvs(self):
        return ["/dev/kvmsnap-vg/srv"]


def test_logical_volumes_are_found_when_the_appliance_kernel_names_disks_otherwise():
    pv = {"where": "vdisk1/p4", "drive": 1, "partition": 4, "kind": "lvm-pv", "key": None}
    found = guestfs_helper._logical_volumes(KernelOrderAppliance(), {"/dev/sdb4": pv})
    assert found == [{"where": "vdisk1/lvm/kvmsnap-vg/srv", "parent": "vdisk1/p4",
                      "device": "/dev/kvmsnap-vg/srv"}]
    # a PV device that is not one (pvuuid fails) finds nothing, and raises nothing
    assert guestfs_helper._logical_volumes(KernelOrderAppliance(), {"/dev/sdb5": pv}) == []


def test_luks_keys_from_the_config_and_the_command_line(tmp_path):
    key = tmp_path / "data.key"
    key.write_bytes(b"secret")
    assert fork_options({"luks_keys": {UUID.upper(): str(key)}}).luks_keys == ((UUID, key),)
    args = cli.build_parser().parse_args(["fork", "--domain", "web",
                                          "--luks-key", f"{UUID}={key}"])
    assert cli._job_from_args(args).fork.luks_keys == ((UUID, key),)
    with pytest.raises(UsageError, match="does not exist"):
        fork_options({"luks_keys": {UUID: str(tmp_path / "missing")}})
    with pytest.raises(UsageError, match="expected a table of LUKS UUID = key file path"):
        fork_options({"luks_keys": "nope"})
