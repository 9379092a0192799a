"""One training process per run folder: a lock file that names its holder."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from types import TracebackType

LOCK_FILE = ".protoseg.lock"


class RunFolderBusyError(RuntimeError):
    """Another process trains into the same run folder."""


class RunLock:
    """An exclusive advisory lock on ``<out_dir>/.protoseg.lock``, released on exit.

    The operating system drops the lock when its process dies, so a crashed run never
    blocks the next one; the file's text (host and pid) says who holds it.
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True) -> None:
        self.path = Path(out_dir) / LOCK_FILE
        self.enabled = enabled
        self._handle: int | None = None

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise RunFolderBusyError(
                f"cannot use the run folder {self.path.parent} ({exc.strerror}); set "
                "train.out_dir to a writable folder"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(handle)
            raise RunFolderBusyError(
                f"{self.path.parent} is in use by another training process ({holder}); wait "
                "for it to finish, or set train.out_dir to another folder"
            ) from None
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._handle = handle
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            os.close(self._handle)
            self._handle = None
