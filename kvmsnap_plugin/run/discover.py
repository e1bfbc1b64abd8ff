"""Which VMs a run backs up, found on libvirt: ``--all`` (config ``[run] all_domains``),
``--exclude GLOB``, and ``[[vm]]`` tables whose ``domain`` is a glob (``domain = "db-*"``).

Every running domain becomes a job. A ``[[vm]]`` that names its domain exactly wins; a
domain it does not name takes the settings (archivers, fork options, commands) of the first
``[[vm]]`` whose glob matches it, under the domain's own name. With ``--all`` the command
line's settings are a ``domain = "*"`` template. A running domain that no table matches is
left out with a warning (there is no archive target to give it), and ``exclude`` leaves out
every VM whose name it matches, whichever way it was listed.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import replace

from kvmsnap_plugin.model import BackupJob

log = logging.getLogger(__name__)

GLOB_CHARS = frozenset("*?[")


def is_glob(name: str | None) -> bool:
    return bool(name) and not GLOB_CHARS.isdisjoint(name or "")


def running_domains(uri: str) -> list[str]:
    """The running libvirt domains of ``uri``."""
    from kvmsnap_plugin.backends.libvirt import connect
    from kvmsnap_plugin.backends.libvirt_host import running_domain_names

    conn = connect(uri)
    try:
        return running_domain_names(conn)
    finally:
        conn.close()


def domain_jobs(jobs: Sequence[BackupJob], uri: str, exclude: Sequence[str] = (),
                all_domains: bool = True, running: Sequence[str] | None = None
                ) -> list[BackupJob]:
    """``jobs`` with their glob tables replaced by a job per matching running domain
    (``running``: asked of libvirt at ``uri`` when None), less the excluded names."""
    templates = [j for j in jobs if is_glob(j.domain)]
    explicit = [j for j in jobs if not is_glob(j.domain)]
    if templates or all_domains:
        named = {j.domain for j in explicit if j.domain}
        for domain in running_domains(uri) if running is None else running:
            if domain in named:
                continue
            template = next((t for t in templates
                             if fnmatch.fnmatchcase(domain, t.domain or "")), None)
            if template is not None:
                explicit.append(replace(template, name=domain, domain=domain))
            elif all_domains and not _excluded(domain, exclude):
                log.warning("%s: not backed up: no [[vm]] domain glob matches it (add a "
                            "[[vm]] with domain = \"*\" and its archivers)", domain)
    return [j for j in explicit if not _excluded(j.name, exclude)]


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)
