"""Recovery and checking of crash images: see `runner` for the entry points, `outcome` for the rules."""

from crashlab.check.mounts import HostMounts, MountBackend, MountRequest, MountSteps
from crashlab.check.outcome import CheckRecord, Outcome, ToolRun
from crashlab.check.runner import CheckItem, Oracle, check_batch, check_image

__all__ = ["CheckItem", "CheckRecord", "HostMounts", "MountBackend", "MountRequest", "MountSteps",
           "Oracle", "Outcome", "ToolRun", "check_batch", "check_image"]
