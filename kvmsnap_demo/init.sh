#!/bin/sh
# PID 1 of the kvmsnap demo guest (busybox, no systemd).
#
# It makes the difference between a crash-consistent copy and a clean shutdown visible:
# ext4 with commit=600 and no periodic writeback keeps the workload's lines in the page
# cache, so a copy of the disk taken while the guest runs lacks them and needs journal
# recovery, while an orderly shutdown (power button) writes them out and unmounts.
#
# Kernel command line knobs:
#   kvmsnap.disks=N          data disks /dev/vda.. to mount and write to (default 1)
#   kvmsnap.power=ignore     see the power button but do not shut down
#   kvmsnap.interval=SECONDS pause between workload lines (default 0.1)
#   kvmsnap.probe=1          print a marker and power off at once (accelerator probe)
#   kvmsnap.fill=MIB         fill a tmpfs with MIB of random data first (RAM really in use)
#   kvmsnap.ticker=1         print "T" every 10 ms on the second serial port (ttyS1), so the
#                            host can time the gaps the guest's outside world sees
#   kvmsnap.callhome=PORT    configure eth0 (slirp) and, when the power button is pressed,
#                            try to reach the host on 10.0.2.2:PORT (a network isolation test)
#   kvmsnap.agent=1          a minimal guest agent on virtio-serial port
#                            org.qemu.guest_agent.0: "guest-shutdown" shuts down cleanly
#   kvmsnap.writer=1         read "W <MiB> <name>" lines on the third serial port (ttyS2) and
#                            write that many MiB of zeros to /mnt/vda/<name> with fsync,
#                            printing KVMSNAP-WROTE <name> <MiB> (benchmarks drive writes)
#   kvmsnap.instant=1        also write each line's number to /mnt/vda/instant with O_DIRECT,
#                            straight to the disk (no page cache): the disk's view of the
#                            counter, to compare with the one in RAM (the fork's one instant);
#                            and write non-zero 4 KiB records into /mnt/vda/stream, O_DIRECT,
#                            each once the last is written (STREAM records, then it stops): a
#                            guest that runs unseen between a disk and a RAM snapshot leaves
#                            a run of zero records in its clone's copy
#
# Console markers: KVMSNAP-READY, KVMSNAP-COUNT n, KVMSNAP-POWER-BUTTON,
# KVMSNAP-WORKLOAD-STOPPED n, KVMSNAP-UNMOUNTED, KVMSNAP-POWER-BUTTON-IGNORED.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run

DISKS=1 POWER=handle INTERVAL=0.1 PROBE=0 FILL=0 TICKER=0 CALLHOME=0 WRITER=0 AGENT=0
INSTANT=0 STREAM=20000 STREAMING=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        kvmsnap.disks=*) DISKS=${arg#*=} ;;
        kvmsnap.power=*) POWER=${arg#*=} ;;
        kvmsnap.interval=*) INTERVAL=${arg#*=} ;;
        kvmsnap.probe=*) PROBE=${arg#*=} ;;
        kvmsnap.fill=*) FILL=${arg#*=} ;;
        kvmsnap.ticker=*) TICKER=${arg#*=} ;;
        kvmsnap.callhome=*) CALLHOME=${arg#*=} ;;
        kvmsnap.writer=*) WRITER=${arg#*=} ;;
        kvmsnap.agent=*) AGENT=${arg#*=} ;;
        kvmsnap.instant=*) INSTANT=${arg#*=} ;;
    esac
done

if [ "$PROBE" = 1 ]; then
    echo KVMSNAP-PROBE-OK
    poweroff -f
fi

# Order matters: the cloud kernel has no modules.dep in its package.
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
         virtio_blk button evdev failover net_failover virtio_net virtio_console; do
    insmod /lib/modules/$m.ko 2>/dev/null || echo "KVMSNAP-WARN insmod $m failed"
done

echo 0 > /proc/sys/vm/dirty_writeback_centisecs
echo 360000 > /proc/sys/vm/dirty_expire_centisecs

# Disks appear asynchronously after virtio_blk loads.
NAMES=""
for letter in a b c d e f g h; do
    [ "$(echo $NAMES | wc -w)" -ge "$DISKS" ] && break
    NAMES="$NAMES vd$letter"
done
for name in $NAMES; do
    tries=0
    while [ ! -b /dev/$name ] && [ $tries -lt 100 ]; do sleep 0.1; tries=$((tries + 1)); done
    mkdir -p /mnt/$name
    mount -t ext4 -o commit=600 /dev/$name /mnt/$name || echo "KVMSNAP-ERROR mount $name"
done

if [ "$FILL" -gt 0 ]; then
    mkdir -p /fill
    mount -t tmpfs -o size=$((FILL + 16))m tmpfs /fill
    dd if=/dev/urandom of=/fill/random bs=1M count="$FILL" 2>/dev/null
    echo "KVMSNAP-FILLED $FILL MiB"
fi

if [ "$TICKER" = 1 ]; then
    (while true; do echo T; usleep 10000; done > /dev/ttyS1) &
fi

ip link set lo up 2>/dev/null
ip link set eth0 up 2>/dev/null
if [ "$CALLHOME" != 0 ]; then
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
fi

call_home() {
    # Each attempt says who the guest thinks it is; the host counts what arrives.
    for attempt in 1 2 3; do
        echo "power button, attempt $attempt, carrier $(cat /sys/class/net/eth0/carrier)" |
            nc -w 2 10.0.2.2 "$CALLHOME" 2>/dev/null && echo "KVMSNAP-CALLED-HOME $attempt"
    done
    echo "KVMSNAP-CALLHOME-DONE carrier=$(cat /sys/class/net/eth0/carrier 2>/dev/null)"
}

if [ "$INSTANT" = 1 ]; then
    # Written and synced once, so that its inode and block are in place on the disk (a
    # crash copy is read without journal replay); then only its data block changes.
    dd if=/dev/zero of=/mnt/vda/instant bs=4096 count=1 conv=fsync 2>/dev/null
    sync
    # Preallocated and synced (O_DIRECT extending an ext4 file may fall back to the page
    # cache); whole 4 KiB blocks, so that every write is direct.
    fallocate -l $((STREAM * 4096)) /mnt/vda/stream && sync
    yes | dd of=/mnt/vda/stream bs=4096 count="$STREAM" iflag=fullblock oflag=direct \
        conv=notrunc 2>/dev/null &
    STREAMING=$!
fi

workload() {
    i=0
    while [ ! -e /run/stop ]; do
        i=$((i + 1))
        for name in $NAMES; do echo "line $i" >> /mnt/$name/workload.log; done
        [ "$INSTANT" = 1 ] && echo "$i" | dd of=/mnt/vda/instant bs=4096 count=1 \
            conv=notrunc,sync iflag=fullblock oflag=direct 2>/dev/null
        echo "KVMSNAP-COUNT $i"
        sleep "$INTERVAL"
    done
    echo "$i" > /run/last
    echo "KVMSNAP-WORKLOAD-STOPPED $i"
}
workload &
WORKLOAD=$!

if [ "$WRITER" = 1 ]; then
    exec 4</dev/ttyS2  # open now, not in the subshell: requests sent after READY must arrive
    (while read -r verb mib name; do
        [ "$verb" = W ] || continue
        dd if=/dev/zero of="/mnt/vda/$name" bs=1M count="$mib" conv=fsync 2>/dev/null
        echo "KVMSNAP-WROTE $name $mib"
    done <&4) &
fi

POWER_EVENT=""
for dev in /sys/class/input/event*; do
    [ "$(cat "$dev/device/name" 2>/dev/null)" = "Power Button" ] && POWER_EVENT=/dev/input/${dev##*/}
done
# Open the button before announcing READY: evdev queues events only for open readers, so a
# press sent right after READY would otherwise be lost while dd is still starting.
[ -n "$POWER_EVENT" ] && exec 3<"$POWER_EVENT"
echo "KVMSNAP-READY disks=$NAMES power=$POWER power_event=$POWER_EVENT"

# The orderly shutdown: stop the workload, leave a marker, flush, unmount, power off.
# Reached from the power button or the guest agent, whichever comes first.
clean_shutdown() {
    touch /run/stop
    wait $WORKLOAD 2>/dev/null
    while [ ! -e /run/last ]; do sleep 0.1; done
    last=$(cat /run/last)
    [ -n "$STREAMING" ] && kill "$STREAMING" 2>/dev/null && wait "$STREAMING" 2>/dev/null
    for name in $NAMES; do echo "clean shutdown after line $last" > /mnt/$name/clean-shutdown; done
    sync
    for name in $NAMES; do umount /mnt/$name || echo "KVMSNAP-ERROR umount $name"; done
    echo KVMSNAP-UNMOUNTED
    poweroff -f
}

if [ "$AGENT" = 1 ]; then
    port=""
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
    done
    echo "KVMSNAP-AGENT port=$port"
    # Reads end with EOF while no host side is connected: keep reopening the port.
    (while true; do
        while read -r request; do
            case "$request" in
                *guest-shutdown*) echo KVMSNAP-AGENT-SHUTDOWN; clean_shutdown ;;
            esac
        done < "$port"
        sleep 0.2
    done) &
fi

wait_for_power_button() {
    # One input_event (24 bytes on x86_64) is enough: the press itself.
    dd of=/dev/null bs=24 count=1 <&3 2>/dev/null
}

if [ -z "$POWER_EVENT" ]; then
    echo "KVMSNAP-ERROR no power button input device"
    while true; do sleep 3600; done
fi

if [ "$POWER" = ignore ]; then
    while true; do
        wait_for_power_button
        echo KVMSNAP-POWER-BUTTON-IGNORED
    done
fi

wait_for_power_button
echo KVMSNAP-POWER-BUTTON
[ "$CALLHOME" != 0 ] && call_home
clean_shutdown
