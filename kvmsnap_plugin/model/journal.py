"""The journal's typed state: what a run records before doing it."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from kvmsnap_plugin.model.defaults import Phase
from kvmsnap_plugin.model.vm import ForkedDisk


@dataclass(frozen=True)
class JournalState:
    """Everything a run records before doing it, so `kvmsnap recover` can undo it."""

    vm: str = ""
    identity: str = ""
    phase: Phase = Phase.PREPARING
    pid: int = 0  # the kvmsnap process of the run
    boot: str | None = None  # the host's boot id when the run started
    mount_root: str | None = None
    # the parent, per backend
    backend: str = "qmp"  # "qmp" or "libvirt"
    qmp: str | None = None
    parent: str | None = None  # PID:START of the parent's QEMU
    domain: str | None = None
    libvirt_uri: str | None = None
    uuid: str | None = None
    # what the run created
    workdir: str | None = None
    sockets: str | None = None
    overlays: tuple[ForkedDisk, ...] = ()
    #: the parent's migration settings before kvmsnap changed them, until they are put back
    migration_settings: dict[str, Any] | None = None
    #: kvmsnap sent ``migrate`` (its RAM snapshot): recovery may let it end or cancel it;
    #: a migration it did not start is never touched
    migration_started: bool = False
    clone: str | None = None  # PID:START of the clone's QEMU
    files: tuple[str, ...] = ()
    mounts: tuple[str, ...] = ()
    loop_files: tuple[str, ...] = ()
    loops: tuple[str, ...] = ()
    exports: tuple[str, ...] = ()
    qsd: str | None = None  # PID:START of the export daemon
    version: int = 1

    def updated(self, **changes: Any) -> JournalState:
        """A copy with ``changes``; an unknown field name raises TypeError."""
        return replace(self, **{k: tuple(v) if isinstance(v, list) else v
                                for k, v in changes.items()})

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["overlays"] = [d.as_dict() for d in self.overlays]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JournalState:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["overlays"] = tuple(ForkedDisk.from_dict(d) for d in data.get("overlays", []))
        values["phase"] = Phase(data.get("phase", Phase.PREPARING))
        return cls().updated(**values)
