"""Files written whole or not at all: a temp file in the same folder and a rename.

Readers never see half a file and a re-run overwrites, never appends. A temp file names its
writer (host, pid) so that a later attempt can delete what a killed writer left behind without
touching a live writer's file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import threading
import time
from collections.abc import Collection
from pathlib import Path


class OutputWriteError(OSError):
    """An output file cannot be written (folder not writable, disk full, read-only file system).

    One line naming the file and the system's reason (plus, for a permission or not-a-folder
    problem, which existing path is in the way); ``errno`` is the original one, which is
    chained as ``__cause__``. Raised instead of a bare OSError, whose text often lacks the
    path ("[Errno 28] No space left on device").
    """

    def __init__(self, path: Path, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.filename = str(path)
        message = f"cannot write {path}: {cause.strerror or cause}"
        blocker = _deepest_existing(path.parent)
        if cause.errno in (errno.EACCES, errno.EPERM) and blocker is not None:
            message += f" ({blocker} is not writable by uid {os.geteuid()})"
        elif cause.errno == errno.ENOTDIR and blocker is not None and not blocker.is_dir():
            message += f" ({blocker} is a file, not a folder)"
        self.message = message

    def __str__(self) -> str:
        return self.message


def _deepest_existing(folder: Path) -> Path | None:
    for candidate in (folder, *folder.parents):
        if os.path.lexists(candidate):
            return candidate
    return None


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and a rename.

    On failure nothing is left behind (no temp file, the old ``path`` untouched) and an
    OSError comes out as :class:`OutputWriteError` naming ``path``.
    """
    tmp = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, OutputWriteError):
            raise OutputWriteError(path, exc) from exc
        raise


# A temp file names its writer (host, pid): a process killed between open and rename (SIGKILL,
# the OOM killer, a lost node) leaves it behind, and a later attempt, with another pid, must
# tell such a leftover from a live writer's file before deleting it (remove_stale_temps).
_HOST = re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname()) or "host"
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.\d+\.tmp")
STALE_TEMP_S = 3600.0  # no single output write takes an hour: an older temp file is a leftover


def remove_stale_temps(folder: Path, targets: Collection[str] | None = None) -> int:
    """Delete the temp files that dead writers' atomic_write left in ``folder`` (only those for
    the file names ``targets``, if given); return how many.

    A temp file is deleted only when its writer is certainly gone: a process of this host that
    no longer exists, or (another host's) one not written to for STALE_TEMP_S. A live writer's
    temp file stays: an attempt still running elsewhere is never disturbed.
    """
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    removed = 0
    for entry in entries:
        m = _TEMP_NAME.fullmatch(entry.name)
        if m is None or (targets is not None and m["target"] not in targets):
            continue
        try:
            old = time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_S
            if old or (m["host"] == _HOST and not _process_exists(int(m["pid"]))):
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:  # renamed or removed meanwhile
            continue
    return removed


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
