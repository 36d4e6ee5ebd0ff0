"""Every error vmkit raises on purpose derives from VmkitError.

The API maps each class to one HTTP status; the CLI prints the message and exits non-zero.
"""


class VmkitError(Exception):
    """Base class. `status` is the HTTP status the API answers with."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(VmkitError):
    status = 400


class Forbidden(VmkitError):
    status = 403


class NotFound(VmkitError):
    status = 404


class Conflict(VmkitError):
    """The request is valid but the resource's current state does not allow it."""

    status = 409


class Timeout(VmkitError):
    status = 504


class CommandFailed(VmkitError):
    """A host program (qemu-img, apt-get, …) failed."""

    status = 500


class NoSpace(VmkitError):
    """The filesystem that would hold the data is full (ENOSPC); 507 is HTTP's "Insufficient Storage"."""

    status = 507
