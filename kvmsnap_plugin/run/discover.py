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
    """``jobs`` with their glob tables replaced by a job per matching running domain, less
    the excluded names. A glob looks at its own table's libvirt; ``all_domains`` at ``uri``'s.
    ``running``: the domains (of every libvirt asked), else each libvirt is asked."""
    templates = [j for j in jobs if is_glob(j.domain)]
    found = [j for j in jobs if not is_glob(j.domain)]
    named = {(j.libvirt_uri, j.domain) for j in found if j.domain}
    uris = [t.libvirt_uri for t in templates] + ([uri] if all_domains else [])
    for where in dict.fromkeys(uris):
        for domain in running_domains(where) if running is None else running:
            if (where, domain) in named:
                continue
            template = next((t for t in templates if t.libvirt_uri == where
                             and fnmatch.fnmatchcase(domain, t.domain or "")), None)
            if template is not None:
                found.append(replace(template, name=domain, domain=domain))
            elif all_domains and where == uri and not _excluded(domain, exclude):
                log.warning("%s: not backed up: no [[vm]] domain glob matches it (add a "
                            "[[vm]] with domain = \"*\" and its archivers)", domain)
    return [j for j in found if not _excluded(j.name, exclude)]


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)
