"""Storage errors: one line naming the location (``s3://bucket/key`` or a path), never a secret.

They are OSErrors, so code that handles a missing or unreadable file handles them too.
Messages are built here from the location and the server's error code only: a credential
never appears in them, and the original exception is not chained (``raise ... from None``),
so a task log shows the one line, not botocore's request details.
"""

from __future__ import annotations


class StorageError(OSError):
    """A storage operation failed; ``str()`` is one line naming the bucket/key or path."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The bucket, the object or the folder does not exist."""


class BucketNotFoundError(StorageNotFoundError):
    """The bucket itself does not exist (a wrong URL, not a missing object)."""


class StorageAccessError(StorageError, PermissionError):
    """The server refused: wrong key or secret, or no permission on the bucket."""


class StorageConfigError(StorageError, ValueError):
    """The storage URL or its options are unusable (no retry can fix it)."""
