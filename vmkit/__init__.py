"""vmkit: a KVM/QEMU virtualization manager driving QEMU directly over QMP."""

__version__ = "0.1.0"
