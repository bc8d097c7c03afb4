"""Recorders: who writes the log of a guest's I/O, the one table the whole project uses.

A `Recorder` is a string enum: wherever it is stored or printed (run.json, store keys, crash-state
ids) it is its name, byte for byte. See DESIGN.md, "The pipeline" and "Ordering semantics".
"""

from __future__ import annotations

import enum


class Recorder(enum.StrEnum):
    logs: bool  # a log comes out, for the durability model to read
    in_guest: bool  # device-mapper in the guest, with the log on a second virtio disk
    meaning: str

    def __new__(cls, name: str, logs: bool, in_guest: bool, meaning: str) -> Recorder:
        member = str.__new__(cls, name)
        member._value_ = name
        member.logs, member.in_guest, member.meaning = logs, in_guest, meaning
        return member

    QEMU = ("qemu", True, False,
            "QEMU blklogwrites below the virtio disk: what left QEMU for the host, after the cache mode")
    DM = ("dm", True, True,
          "dm-log-writes in the guest under the filesystem: the guest's view, before the cache mode")
    NONE = ("none", False, False, "no log: live faults (dm-flakey) and unrecorded runs")
    HOST_DM = ("host-dm", True, False,
               "dm-log-writes on the host under the image file's filesystem: what the host page cache "
               "wrote back, mapped to the image's bytes")

    @property
    def token(self) -> str:
        """The name inside a crash-state id, whose fields are separated by '-'."""
        return self.value.replace("-", "")


RECORDERS: dict[str, Recorder] = {r.value: r for r in Recorder}
BY_TOKEN: dict[str, Recorder] = {r.token: r for r in Recorder}
LOGGING: tuple[Recorder, ...] = tuple(r for r in Recorder if r.logs)  # what the model can read


class UnknownRecorder(ValueError):
    def __init__(self, name: str, valid: tuple[Recorder, ...] = tuple(Recorder)) -> None:
        super().__init__(f"unknown recorder {name!r}; valid recorders: {', '.join(valid)}")


def recorder(name: str | Recorder, valid: tuple[Recorder, ...] = tuple(Recorder)) -> Recorder:
    """The recorder named `name`, one of `valid` (default: any)."""
    found = RECORDERS.get(str(name).strip().lower())
    if found is None or found not in valid:
        raise UnknownRecorder(str(name), valid)
    return found
