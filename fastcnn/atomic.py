"""Writing files so that nothing is lost: a temporary file beside the destination, renamed into
place only when complete, with the permissions ``open(path, "wb")`` would give.

Temporary names carry the writer's process id (``.<name>.<pid>.<random><suffix>``), so a later
write to the same folder can remove the ones whose writer died (``kill -9``, a power cut) without
touching those of a writer still running.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from pathlib import Path


def resolve(path) -> Path:
    """Where writing ``path`` really lands: a symbolic link's target (the link stays a link)."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def check_path(path, what="file") -> Path:
    """``path`` as a Path: a str or path-like that is not empty, else a TypeError or
    ValueError naming ``what`` it was for."""
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"the path of the {what} must be a str or a pathlib.Path, got {path!r}")
    if not os.fspath(path):
        raise ValueError(f"the path of the {what} is empty")
    return Path(path)


_SPECIAL = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
            (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def _not_a_regular_file(target: Path):
    """What ``target`` is when it exists and is neither a regular file nor a folder, else
    None (writing replaces the file at the path: a device or a FIFO must not be)."""
    try:
        mode = target.stat().st_mode
    except OSError:
        return None
    return next((name for test, name in _SPECIAL if test(mode)), None)


def check_destination(path, what="file") -> Path:
    """Fail now, with a message naming the path, if ``path`` cannot be written later: not a
    path, a missing folder, a folder or something that is not a regular file in its place (a
    device, a FIFO: writing would replace it), a folder where no file can be created (no
    permission, a read-only or special file system). Returns the resolved destination."""
    target = resolve(check_path(path, what))
    folder = target.parent
    if target.is_dir():
        raise IsADirectoryError(f"cannot write the {what} to {path}: it is a folder; give a "
                                f"file name")
    special = _not_a_regular_file(target)
    if special:
        raise ValueError(f"cannot write the {what} to {path}: it is {special}, not a regular "
                         f"file, and writing would replace it; give a file's path")
    if not folder.is_dir():
        why = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"cannot write the {what} to {path}: the folder {folder} {why}")
    try:  # the test that counts: create a file there (os.access says yes to root anywhere)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.{os.getpid()}.",
                                     suffix=".probe")
    except OSError as e:
        raise PermissionError(f"cannot write the {what} to {path}: no file can be created in "
                              f"{folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)
    return target


def _umask() -> int:
    try:  # Linux 4.7+: read it without changing it (os.umask would, for every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(target: Path) -> int:
    """The old file's mode when replacing one, else what the umask gives a new file."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or a pid we cannot ask about): leave it
    return True


def remove_stale(folder, name, suffix) -> list[Path]:
    """Remove the temporary files for ``name`` in ``folder`` whose writing process is gone;
    returns what was removed."""
    pattern = re.compile(rf"\.{re.escape(name)}\.(\d+)\.[^.]+{re.escape(suffix)}\Z")
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(entry)
    return removed


@contextlib.contextmanager
def temporary_beside(path, suffix=".tmp"):
    """Yield ``(file object, temporary path)`` beside ``path``'s real destination; on success the
    caller renames it with ``commit``; on any failure, or if not committed, it is removed."""
    target = resolve(path)
    remove_stale(target.parent, target.name, suffix)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.",
                               suffix=suffix)
    try:
        os.fchmod(fd, _mode_for(target))
        with os.fdopen(fd, "wb") as f:
            yield f, Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def commit(f, tmp: Path, path) -> None:
    """Flush ``f`` to disk and rename ``tmp`` over ``path``'s real destination (never over
    something that is not a regular file)."""
    target = resolve(path)
    special = _not_a_regular_file(target)
    if special:
        raise ValueError(f"not replacing {path}: it is {special}, not a regular file")
    f.flush()
    os.fsync(f.fileno())
    os.replace(tmp, target)
    with contextlib.suppress(OSError):  # make the rename itself durable
        dirfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)


def atomic_write(path, write) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, then rename it to ``path``
    (through a symbolic link, to its target). A failure leaves the old file as it was, and an
    OSError (a full disk) names the path."""
    try:
        with temporary_beside(path) as (f, tmp):
            write(f)
            commit(f, tmp, path)
    except OSError as e:
        if e.errno is None:
            raise type(e)(f"cannot write {path}: {e}") from e
        raise type(e)(e.errno, f"cannot write {path}: {e.strerror or e}") from e
