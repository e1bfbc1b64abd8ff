"""Make the libguestfs route's test disk, with libguestfs itself (no host device-mapper
needed): run by ``/usr/bin/python3 guestfs_disk.py IMAGE KEYFILE XFS``, the system Python
that has the binding. A GPT qcow2 disk: p1 an LVM PV (VG ``k-vg``, with a hyphen as
installers name them, so its mapper names are k--vg-*; LVs ``srv`` ext4, ``data`` the xfs
image XFS made on the host: Debian's appliance has no mkfs.xfs without libguestfs-xfs,
``tank`` btrfs), p2 LUKS (key from KEYFILE) with ext4 inside, p3 vfat, p4 NTFS; each
filesystem holds ``marker-NAME.txt`` ("marker NAME"). Prints the LUKS UUID."""

import os
import sys

import guestfs

MIB_SECTORS = 2048
#: (partition, first MiB, last MiB): LVM 520 MiB (xfs wants 300 MiB at least), LUKS 70 MiB,
#: vfat 40 MiB, NTFS the rest
PARTITIONS = [(1, 1, 521), (2, 521, 591), (3, 591, 631)]
DISK_MIB = 700
#: the logical volumes: (name, MiB, filesystem; None: the uploaded xfs image, marked already)
VOLUMES = [("srv", 40, "ext4"), ("data", 320, None), ("tank", 128, "btrfs")]


def main(image: str, key_file: str, xfs_image: str) -> None:
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    with open(key_file, "rb") as key_in:
        key = key_in.read().decode("utf-8")
    g = guestfs.GuestFS(python_return_dict=True)
    g.disk_create(image, "qcow2", DISK_MIB << 20)
    g.add_drive_opts(image, format="qcow2", readonly=False)
    g.launch()
    disk = g.list_devices()[0]
    g.part_init(disk, "gpt")
    for _, first, last in PARTITIONS:
        g.part_add(disk, "p", first * MIB_SECTORS, last * MIB_SECTORS - 1)
    g.part_add(disk, "p", PARTITIONS[-1][2] * MIB_SECTORS, -MIB_SECTORS)
    g.pvcreate(disk + "1")
    g.vgcreate("k-vg", [disk + "1"])
    for name, mib, fstype in VOLUMES:
        g.lvcreate(name, "k-vg", mib)
        if fstype:
            g.mkfs(fstype, f"/dev/k-vg/{name}")
        else:
            g.upload(xfs_image, f"/dev/k-vg/{name}")
    g.luks_format(disk + "2", key, 0)
    g.cryptsetup_open(disk + "2", key, "secret")
    g.mkfs("ext4", "/dev/mapper/secret")
    g.mkfs("vfat", disk + "3")
    g.mkfs("ntfs", disk + "4")
    marked = [(f"/dev/k-vg/{name}", name) for name, _, fstype in VOLUMES if fstype]
    marked += [("/dev/mapper/secret", "luks"), (disk + "3", "vfat"), (disk + "4", "ntfs")]
    for device, name in marked:
        g.mount(device, "/")
        g.write(f"/marker-{name}.txt", f"marker {name}\n")
        g.umount("/")
    g.cryptsetup_close("/dev/mapper/secret")
    print(g.vfs_uuid(disk + "2"))
    g.shutdown()
    g.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
