"""crashlab: crash-consistency fault injection for QEMU disk cache modes and filesystem barriers."""

__version__ = "0.1.0"
