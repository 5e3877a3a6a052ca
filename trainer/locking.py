"""One run at a time per output: a lock file beside it, held while the run lives (the operating system releases it
when the process ends, however it ends, so a crash never leaves a stale lock)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .config import ConfigError

if os.name == "nt":
    import msvcrt

    def _lock(fd: int) -> None:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


def lock_path(output: str | os.PathLike) -> Path:
    path = Path(output)
    return path.with_name(path.name + ".lock")  # not *.safetensors: model lists do not show it


@contextlib.contextmanager
def exclusive(output: str | os.PathLike):
    """While inside, no other run (in this process or another) can train into `output`."""
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            _lock(fd)
        except OSError:
            holder = path.read_text(errors="replace").strip() or "unknown"
            raise ConfigError(f"output: another run is training into {output} (process {holder}); wait for it to "
                              "finish, stop it, or choose another output") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        try:
            yield
        finally:
            _unlock(fd)
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        os.close(fd)
