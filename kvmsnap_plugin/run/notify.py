"""Commands by outcome, after each VM (``on_success``/``on_warning``/``on_failure``): how
healthchecks.io, ntfy or mail hear of a backup (see ``contrib/kvmsnap-notify``).

A notification is not the backup: a command that fails or hangs is logged as a warning and
never changes the VM's result.
"""

from __future__ import annotations

import json
import logging

from kvmsnap_plugin.errors import KvmsnapError
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import BackupJob, VmCommands, VmOutcome

log = logging.getLogger(__name__)

#: seconds a command may take (a ping with retries); it is then killed
COMMAND_TIMEOUT = 60.0


def command_for(commands: VmCommands, status: str) -> tuple[str, ...]:
    """ok -> on_success; a warning or a skip -> on_warning, or on_success when there is
    none (the run did not fail: a healthcheck must not go silent); error -> on_failure."""
    if status == "ok":
        return commands.on_success
    if status in ("warning", "skipped"):
        return commands.on_warning or commands.on_success
    return commands.on_failure


def command_env(outcome: VmOutcome) -> dict[str, str]:
    """What the command learns, besides kvmsnap's own environment."""
    return {"KVMSNAP_VM": outcome.vm, "KVMSNAP_STATUS": outcome.status,
            "KVMSNAP_EXIT_CODE": str(outcome.exit_code),
            "KVMSNAP_RESULT": json.dumps(outcome.as_dict(), default=str)}


def after_vm(job: BackupJob, outcome: VmOutcome, timeout: float = COMMAND_TIMEOUT) -> bool:
    """Run the job's command for this outcome, if it has one; False if it failed."""
    argv = command_for(job.commands, outcome.status)
    if not argv:
        return True
    log.info("%s: %s: running %s", outcome.vm, outcome.status, argv[0])
    try:
        process.run(argv, timeout=timeout, env=command_env(outcome))
    except (KvmsnapError, OSError) as exc:
        log.warning("%s: the %s command failed (the backup's result stands): %s",
                    outcome.vm, outcome.status, exc)
        return False
    return True
