"""The commented example `kvmsnap config example` prints: contrib/kvmsnap.toml, kept the
same by a test (an installed package has no contrib/)."""

EXAMPLE = r"""
# kvmsnap configuration (/etc/kvmsnap/kvmsnap.toml): `kvmsnap backup --config FILE`.
# Check it with `kvmsnap config validate`; `kvmsnap config example` prints this file.
# Every key's type is checked and unknown keys are refused. Options given on the command
# line (`--mode`, `--shutdown-timeout`, ...) win over this file, for every VM.
# Secrets never go here: borg reads BORG_PASSPHRASE or BORG_PASSCOMMAND, restic
# RESTIC_PASSWORD_FILE (or an archiver's env table naming a command or file that holds them).

[run]                          # what a run of many VMs shares
max_clones = 1                 # clones alive at once (each needs its guest's RAM)
# min_free_ram = "2G"          # host RAM kept free besides the clones'
# metrics_file = "/var/lib/prometheus/node-exporter/kvmsnap.prom"  # textfile collector
# all_domains = true           # also every running libvirt domain with no [[vm]] table
# exclude = ["test-*"]         # VM names or globs left out
# libvirt_uri = "qemu:///system"

[defaults]                     # every [[vm]] may override these
mode = "files"                 # files | image | both
method = "auto"                # auto | background-snapshot | stop-and-copy
shutdown_timeout = 300         # seconds from the power button to a stopped clone
repress_after = 60             # press the power button again after this long
on_unclean = "fail"            # or "crash-consistent": archive the frozen images, labelled
workdir = "/var/tmp/kvmsnap"   # RAM state (the guest's secrets: 0700), clone overlays
# overlay_dir = "/var/lib/kvmsnap/overlays"  # the parents' temporary overlays (default:
#                                            # beside each disk image)
min_free = "1G"                # checked before each pause: the work directory must hold the
                               # RAM state (the guest's RAM) and this much more, and where the
                               # overlays go this much must be free (they grow with the
                               # guest's writes during the backup); a number is bytes
max_pause = 5                  # seconds the VM may be paused at most: a method that cannot
                               # promise it (stop-and-copy of a large RAM) is refused
# keep = "/srv/clean-images"   # also keep each clone's disks, as KEEP/<vm name>/<disk>.qcow2
# collapse_huge_pages = false  # on by default: rebuild the guest RAM's resident huge pages
#                              # once the RAM snapshot split them (while the clone shuts
#                              # down) and, if still needed, before the pause, then read it
#                              # ahead of the pause: shorter pauses, for some host CPU (P1)
# collapse_budget = 2          # seconds of each of those passes at most
# allow_remote_workdir = true  # accept a workdir on NFS/CIFS/FUSE/9p/ceph: the guest's RAM,
#                              # keys included, would be written there (refused by default)
# skip_partitions = ["label:SWAP"]  # partitions known to be left out, without a warning
# Commands run after each VM's backup, by its outcome: argv lists, never a shell.
# on_success = ["curl", "-fsS", "-m", "10", "https://hc-ping.com/YOUR-UUID"]
# on_warning = ["curl", "-fsS", "-m", "10", "https://hc-ping.com/YOUR-UUID/log"]
on_failure = ["logger", "-t", "kvmsnap", "a VM backup failed"]

[[vm]]
name = "web"                   # in archives; default: QEMU's -name, else its UUID
qmp = "/run/qemu/web.qmp"      # -qmp unix:/run/qemu/web.qmp,server=on,wait=off
archivers = ["local-borg", "offsite-restic"]

[[vm]]
name = "db"
qmp = "/run/qemu/db.qmp"
mode = "both"                  # also raw images, for bare-metal style restores
shutdown_timeout = 600         # its database takes a while to stop
archivers = ["local-borg"]
# verify = true                # boot each backup's image archive in a sandbox after it
#                              # is made; not proven: a warning (`kvmsnap verify` by hand)
# verify_command = ["systemctl", "is-system-running", "--wait"]  # via the guest agent
# verify_console = "login:"    # or: came up when a console line matches this regex

# [[vm]]
# domain = "mail"              # a libvirt domain, by name (named after it)
# libvirt_uri = "qemu:///system"
# archivers = ["local-borg"]

[archiver.local-borg]
type = "borg"
repository = "/srv/backup/borg"
compression = "zstd,3"
archive_name = "{vm}-{now:%Y-%m-%dT%H:%M:%S}"   # -files / -image is appended
env = { BORG_PASSCOMMAND = "cat /root/.borg-passphrase" }

[archiver.offsite-restic]
type = "restic"
repository = "sftp:backup@offsite:/srv/restic"
tags = ["nightly"]             # a list, even of one
# extra_args = ["--exclude-caches"]  # more arguments to `restic backup`, a list
env = { RESTIC_PASSWORD_FILE = "/root/.restic-password" }
""".removeprefix("\n")
