#!/bin/sh
# kvmsnap-layout: lays out the realistic Debian test guest's blank second disk, /dev/vdb.
#
# The host passes this script in fw_cfg and boots the guest once with "kvmsnap.layout" on
# the kernel command line (kvmsnap-layout.service runs it, then powers off). It is run in
# the guest because the host may have no device-mapper (no LVM or LUKS there). The disk
# ends up laid out like a distribution installer's:
#
#   vdb1  BIOS boot (GRUB's core image would go here; left empty)
#   vdb2  EFI system partition, vfat, /boot/efi
#   vdb3  swap, in use
#   vdb4  LVM PV of volume group kvmsnap-vg: LV srv (ext4, /srv), the rest free
#   vdb5  btrfs, subvolume @data mounted at /var/lib/btrfs-data
#   vdb6  LUKS2 (ext4 inside, /secret), opened at boot by crypttab with a key file
#
# and fstab/crypttab on the root filesystem name them, so every later boot uses them. It
# also installs the layout's own write load, kvmsnap-layout-workload.service (below): on
# every later boot it appends to a log on each of the new filesystems, fsync'ing the btrfs
# one, so a power-cut copy of the running guest shows each of them dirty. The
# LUKS key is random; the last console line gives it to the host (a test's copy of it):
# KVMSNAP-LAYOUT-BUILT luks=UUID key=HEX, or KVMSNAP-LAYOUT-FAILED.
set -eu
DISK=/dev/vdb
VG=kvmsnap-vg
KEY_FILE=/etc/cryptsetup-keys.d/secret.key
# Cheap under TCG (argon2's default wants a second and 1 GiB); a test key, not a secret.
LUKS_COST="--pbkdf pbkdf2 --pbkdf-force-iterations 1000"
# Fully initialised now, not lazily behind the tests' backs later.
EXT4="mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0"

say() { echo "$*" > /dev/ttyS0; }
trap 'say KVMSNAP-LAYOUT-FAILED' EXIT
uuid() { blkid -p -o value -s UUID "$1"; }

if [ -n "$(blkid -p -o value -s PTTYPE "$DISK" || true)" ]; then
    echo "$DISK is not blank: refusing to lay it out" >&2
    exit 1
fi
sgdisk --clear \
    -n 1:0:+1M -t 1:ef02 -c 1:bios-boot \
    -n 2:0:+64M -t 2:ef00 -c 2:efi \
    -n 3:0:+64M -t 3:8200 -c 3:swap \
    -n 4:0:+320M -t 4:8e00 -c 4:lvm \
    -n 5:0:+256M -t 5:8300 -c 5:btrfs \
    -n 6:0:0 -t 6:8309 -c 6:luks \
    "$DISK"
udevadm settle

mkfs.vfat -F 32 -s 1 -n EFI "${DISK}2"
mkswap -L kvmsnap-swap "${DISK}3"
pvcreate -y "${DISK}4"
vgcreate -y "$VG" "${DISK}4"
lvcreate -y -W y -n srv -L 128M "$VG"
udevadm settle
$EXT4 -L kvmsnap-srv "/dev/$VG/srv"
mkfs.btrfs -q -L kvmsnap-btrfs "${DISK}5"
mount "${DISK}5" /mnt
btrfs -q subvolume create /mnt/@data
umount /mnt

mkdir -p "$(dirname "$KEY_FILE")"
KEY=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
(umask 077 && printf %s "$KEY" > "$KEY_FILE")
# shellcheck disable=SC2086
cryptsetup luksFormat -q --type luks2 $LUKS_COST --label kvmsnap-secret \
    --key-file "$KEY_FILE" "${DISK}6"
cryptsetup open --key-file "$KEY_FILE" "${DISK}6" secret
$EXT4 -L kvmsnap-secret /dev/mapper/secret
cryptsetup close secret

# As the Debian installer writes them (but fsck pass 0: the guest boots with fsck.mode=skip),
# with the same long ext4/btrfs commit interval as the root: buffered writes stay buffered.
cat >> /etc/fstab <<EOF
# the realistic layout on $DISK (kvmsnap-layout)
UUID=$(uuid "${DISK}2") /boot/efi vfat umask=0077 0 0
UUID=$(uuid "${DISK}3") none swap sw 0 0
/dev/mapper/kvmsnap--vg-srv /srv ext4 defaults,commit=600 0 0
UUID=$(uuid "${DISK}5") /var/lib/btrfs-data btrfs defaults,subvol=@data,commit=600 0 0
/dev/mapper/secret /secret ext4 defaults,commit=600 0 0
EOF
echo "secret UUID=$(uuid "${DISK}6") $KEY_FILE luks" >> /etc/crypttab

# The write load of the new filesystems. While mounted read-write, vfat's boot-sector
# dirty bit is set and each ext4 has needs_recovery, whatever is written; btrfs is
# consistent at every commit (every 600 s here) and only an fsync between two commits
# leaves something to replay: its log tree, named by the superblock's log_root. So the
# btrfs log is fsync'ed (coreutils' `sync FILE` is fsync(2)) twice a second; the others
# are appended to buffered, like the root's workload.
cat > /usr/local/sbin/kvmsnap-layout-workload <<'WORKLOAD'
#!/bin/sh
set -u
n=0
while :; do
    n=$((n + 1))
    echo "line $n" >> /var/lib/btrfs-data/fsync.log
    sync /var/lib/btrfs-data/fsync.log
    for dir in /boot/efi /srv /secret; do echo "line $n" >> "$dir/workload.log"; done
    [ "$n" = 2 ] && echo "KVMSNAP-LAYOUT-WORKLOAD fsyncing" > /dev/ttyS0
    sleep 0.5
done
WORKLOAD
chmod 755 /usr/local/sbin/kvmsnap-layout-workload
cat > /etc/systemd/system/kvmsnap-layout-workload.service <<'UNIT'
[Unit]
Description=kvmsnap: the realistic layout's write load
RequiresMountsFor=/boot/efi /srv /var/lib/btrfs-data /secret
ConditionKernelCommandLine=!kvmsnap.layout

[Service]
ExecStart=/usr/local/sbin/kvmsnap-layout-workload

[Install]
WantedBy=multi-user.target
UNIT
systemctl --no-reload enable kvmsnap-layout-workload.service
sync
trap - EXIT
say "KVMSNAP-LAYOUT-BUILT luks=$(uuid "${DISK}6") key=$KEY"
