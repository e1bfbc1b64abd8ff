"""Configuration: a TOML file (many VMs) or command-line options (one VM) -> BackupJobs.

Example (``kvmsnap config example`` prints a commented one, = contrib/kvmsnap.toml)::

    [defaults]
    mode = "files"              # files | image | both
    shutdown_timeout = 300

    [[vm]]
    name = "web"
    qmp = "/run/qemu/web.qmp"
    archivers = ["local-borg"]

    [archiver.local-borg]
    type = "borg"
    repository = "/srv/backup/borg"

Every key's type and range is checked (:mod:`.schema`); unknown keys are refused with the
keys that are allowed; an error is one line naming the file, the table, the key and the
expected type (:mod:`.messages`). Secrets never live in this file: borg and restic read
theirs from the environment (BORG_PASSPHRASE, BORG_PASSCOMMAND, RESTIC_PASSWORD,
RESTIC_PASSWORD_FILE), or from an archiver's ``env`` table that points at a command or
file holding them.
"""

from kvmsnap_plugin.config.example import EXAMPLE
from kvmsnap_plugin.config.loader import (
    Config,
    command_line_settings,
    command_line_targets,
    fork_options,
    load_config,
)

__all__ = ["EXAMPLE", "Config", "command_line_settings",
           "command_line_targets", "fork_options", "load_config"]
