"""One error hierarchy for volmove.

Adapters translate third-party exceptions into these classes; the CLI maps
each class to a one-line message and a distinct exit code.  ``transient``
says whether retrying the same operation later may succeed.
"""

from __future__ import annotations


class VolmoveError(Exception):
    """Base of every error volmove raises on purpose."""

    exit_code = 1
    transient = False
    kind = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(VolmoveError):
    """The command line or a configuration value is wrong."""

    exit_code = 2
    kind = "usage"


class NotFoundError(VolmoveError):
    """A volume, snapshot, container, host or job does not exist."""

    exit_code = 3
    kind = "not_found"


class ConflictError(VolmoveError):
    """The target exists or is busy (non-empty volume, lock held, job running)."""

    exit_code = 4
    kind = "conflict"


class UnreachableError(VolmoveError):
    """A service (Docker engine, S3 endpoint, broker) does not answer."""

    exit_code = 5
    transient = True
    kind = "unreachable"


class AuthError(VolmoveError):
    """Credentials were refused."""

    exit_code = 6
    kind = "auth"


class CorruptDataError(VolmoveError):
    """Stored data failed a check: bad hash, truncated object, forged manifest."""

    exit_code = 7
    kind = "corrupt"


class UnsafeDataError(CorruptDataError):
    """A snapshot asks for something that would escape or damage the target."""

    kind = "unsafe"


class RepositoryError(VolmoveError):
    """The repository is missing, uninitialized or of an unsupported format."""

    exit_code = 8
    kind = "repository"


class StorageError(VolmoveError):
    """The storage backend failed for another reason (disk full, server error)."""

    exit_code = 9
    kind = "storage"


class TransientStorageError(StorageError):
    transient = True


class DockerError(VolmoveError):
    """The Docker engine refused an operation."""

    exit_code = 10
    kind = "docker"


class JobFailedError(VolmoveError):
    """A remote job ended in failure; the message is the worker's."""

    exit_code = 11
    kind = "job_failed"


class CancelledByUser(VolmoveError):
    exit_code = 130
    kind = "cancelled"


EXIT_CODES: dict[str, int] = {
    cls.kind: cls.exit_code
    for cls in (
        VolmoveError, UsageError, NotFoundError, ConflictError, UnreachableError, AuthError,
        CorruptDataError, UnsafeDataError, RepositoryError, StorageError, DockerError,
        JobFailedError, CancelledByUser,
    )
}
