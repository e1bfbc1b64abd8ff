#!/bin/sh
# kvmsnap-workload: the workload of the kvmsnap Debian test guest.
#
# Installed as /usr/local/sbin/kvmsnap-workload and run by kvmsnap-workload.service.
# It appends "line N" to a log on the ext4 root and on the xfs /data volume every INTERVAL
# seconds, never calling fsync: with the guest's writeback settings the lines stay in the
# page cache, so a copy of the disks taken while it runs visibly lacks them, while an
# orderly shutdown writes them out. On SIGTERM (systemd stopping the unit) it finishes the
# current line and writes "clean shutdown after line N" to a marker on both filesystems.
#
# Before it starts counting it writes a marker file, "kvmsnap-marker", into the top of every
# data filesystem mounted (/ and /data; on the realistic layout also /boot/efi, /srv,
# /var/lib/btrfs-data and /secret), buffered like the logs. Each marker names its mount
# point and this boot, so a backup shows which filesystems it holds, from which boot.
#
# Console markers (on /dev/ttyS0): KVMSNAP-MARKER mountpoint source fstype devtype (one
# per marker written), KVMSNAP-SWAP device (one per active swap), KVMSNAP-READY,
# KVMSNAP-COUNT n, KVMSNAP-WORKLOAD-STOPPED n.
set -u
INTERVAL=${KVMSNAP_INTERVAL:-0.1}
CONSOLE=${KVMSNAP_CONSOLE:-/dev/ttyS0}
ROOT_DIR=/var/lib/kvmsnap-workload
DATA_DIR=/data

mkdir -p "$ROOT_DIR" "$DATA_DIR"
# After a restart (a restored backup, say) number on instead of overwriting the evidence.
n=0
if [ -f "$ROOT_DIR/workload.log" ]; then
    n=$(wc -l < "$ROOT_DIR/workload.log")
fi
rm -f "$ROOT_DIR/clean-shutdown" "$DATA_DIR/clean-shutdown"
exec 3>"$CONSOLE" 4>>"$ROOT_DIR/workload.log" 5>>"$DATA_DIR/workload.log"

BOOT_ID=$(cat /proc/sys/kernel/random/boot_id)
for mp in / /data /boot/efi /srv /var/lib/btrfs-data /secret; do
    mountpoint -q "$mp" || continue
    echo "kvmsnap marker of $mp, boot $BOOT_ID" > "${mp%/}/kvmsnap-marker"
    # A btrfs subvolume's source reads /dev/vdb5[/@data]: lsblk wants the device.
    set -- $(findmnt -n -o SOURCE,FSTYPE "$mp")
    device=${1%%[[]*}
    echo "KVMSNAP-MARKER $mp $device $2 $(lsblk -n -d -o TYPE "$device" 2>/dev/null)" >&3
done
tail -n +2 /proc/swaps | while read -r swap _; do echo "KVMSNAP-SWAP $swap" >&3; done

# The trap only sets a flag: the loop always writes a line to both logs before it looks,
# so a SIGTERM between the two writes cannot leave the logs one line apart.
stopping=0
trap 'stopping=1' TERM INT
echo "KVMSNAP-READY" >&3
while [ "$stopping" = 0 ]; do
    n=$((n + 1))
    echo "line $n" >&4
    echo "line $n" >&5
    echo "KVMSNAP-COUNT $n" >&3
    sleep "$INTERVAL" &
    wait $! || true
done
kill $! 2>/dev/null || true
echo "clean shutdown after line $n" > "$ROOT_DIR/clean-shutdown"
echo "clean shutdown after line $n" > "$DATA_DIR/clean-shutdown"
echo "KVMSNAP-WORKLOAD-STOPPED $n" >&3
exit 0
