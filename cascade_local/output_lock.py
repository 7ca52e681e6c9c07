"""Outputs that two processes may write at once: a lock per target, and unique temporary names beside it.

Every job that writes a file (a conversion, a model pull) holds an exclusive `flock` on `.NAME.lock`
in the target's folder for the whole job, and builds its output under a name only it uses
(`tempfile` in the same folder, so the final `os.replace` is an atomic rename on one filesystem).
A second job for the same target waits for the first: it then finds the file made (and refuses it
without --force, or uses it, as a pull does) instead of writing the same bytes into the same file.

The lock file is removed by whoever releases it. A waiter that then gets the lock on the removed
file notices (its descriptor no longer names the path's inode) and locks the new one instead.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from cascade_local.errors import UsageError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the user keeps jobs apart
    fcntl = None  # type: ignore[assignment]


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def output_lock(target: Path, what: str, *, notify: Callable[[str], None] = _say) -> Iterator[None]:
    """Holds the lock on `target` for the block; waits (telling `notify` once) while another process holds it.

    `what` names the job in the message: "another {what} is running; waiting". Ctrl-C while waiting
    interrupts the wait. The target's folder must exist.
    """
    if fcntl is None:
        yield
        return
    path = lock_path(Path(target))
    told = False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot write in {path.parent}: {exc.strerror or exc} (creating {path.name})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not told:
                    notify(f"another {what} is running; waiting")
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder before us removed this lock file: lock the current one
    try:
        yield
    finally:
        # Remove before unlocking, so that no one can lock the old file and think it current.
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def temp_file(target: Path) -> Path:
    """A new empty file beside `target`, named `.NAME.XXXXXXXX.partial`, with the mode a plain `open` would give.

    Made as mkstemp makes its files (O_CREAT | O_EXCL on a random name, so no one else has it), but with mode
    0666 less the umask rather than mkstemp's private 0600: the finished output is an ordinary file.
    """
    target = Path(target)
    while True:
        path = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return path


def temp_dir(target: Path) -> Path:
    """A new empty folder beside `target`, named `.NAME.XXXX.partial`, to build `target` in."""
    target = Path(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
