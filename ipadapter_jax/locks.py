"""A lock on an output folder, so that two writers (two `data build`s on one --out, two `train` runs on one
workdir) never interleave.

The lock is a file created with O_EXCL holding the holder's pid, host, start time and command. A second writer
fails at once with an error naming the file and the holder. A lock left by a process that died (SIGKILL, power
loss) on this host is taken over with a one-line warning: the pid no longer runs, or now belongs to a process
that started later (pid reuse; Linux's /proc start time). A lock from another host cannot be checked and is
never taken over: the error says to delete the file once that build is known to be gone.

In a bucket (gs://) the lock is an object created only if absent (a generation precondition: exactly one of
several writers succeeds), and a dead holder's lock is taken over by a compare-and-swap on its generation; the
rules for "dead" are the same. A pod's processes share one workdir: process 0 alone takes the lock.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator

from ipadapter_jax import paths

logger = logging.getLogger(__name__)

_UNREADABLE_GRACE_S = 10.0  # a lock file still empty after this long belongs to a writer that died creating it


class LockHeldError(RuntimeError):
    """Another live process holds the lock on the folder."""


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[19])  # field 22, after the parenthesised name
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _me() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start_ticks": _start_ticks(os.getpid()),
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:300],
    }


def _read(path: str) -> dict | None:
    try:
        holder = paths.read_json(path)
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _dead(holder: dict) -> bool:
    """True when the holder is known to be gone: a process on this host that no longer runs."""
    if holder.get("host") != socket.gethostname():
        return False
    if not _alive(holder["pid"]):
        return True
    ticks = holder.get("start_ticks")
    return ticks is not None and _start_ticks(holder["pid"]) not in (None, ticks)  # the pid was reused


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "a process that is still writing the lock file"
    return f"pid {holder['pid']} on {holder.get('host')} since {holder.get('time')} ({holder.get('command', '')})"


def _take_over(path: str, holder: dict | None) -> bool:
    """Removes a dead holder's lock file, unless another process replaced it meanwhile; True if removed."""
    aside = f"{path}.stale-{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # someone else removed it: just retry
    if _read(aside) != holder:  # a live process took it over between our read and the rename: give it back
        with contextlib.suppress(OSError):
            os.link(aside, path)
        os.unlink(aside)
        return False
    os.unlink(aside)
    what = "an unfinished lock file" if holder is None else f"pid {holder['pid']} no longer runs"
    logger.warning("warning: took over the stale lock %s (%s)", path, what)
    return True


def acquire(directory: str, lock_name: str, writer: str) -> str:
    """Takes the lock `lock_name` in `directory` (which must exist); returns the lock file's path. `writer` names
    the kind of process that takes it, for the error message (e.g. "`data build`").

    Raises LockHeldError naming the lock file and its holder when a live process holds it."""
    if paths.is_remote(directory):
        return _acquire_remote(paths.join(directory, lock_name), directory, writer)
    path = os.path.join(directory, lock_name)
    me, holder = _me(), None
    for _ in range(40):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is None:  # being written right now, or left empty by a writer that died creating it
                try:
                    age = time.time() - os.stat(path).st_mtime
                except FileNotFoundError:
                    continue
                if age < _UNREADABLE_GRACE_S:
                    time.sleep(0.05)
                    continue
            elif not _dead(holder):
                raise _held_error(path, holder, directory, writer) from None
            _take_over(path, holder)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        return path
    raise LockHeldError(
        f"{path}: the folder is locked by {_describe(holder)}; likely cause: several {writer}s started on "
        f"{directory} at once"
    )


def _held_error(path: str, holder: dict | None, directory: str, writer: str) -> LockHeldError:
    return LockHeldError(
        f"{path}: the folder is locked by {_describe(holder)}; likely cause: another {writer} is writing to "
        f"{directory}: wait for it to finish, or delete the lock file if that process is known to be gone"
    )


def _acquire_remote(path: str, directory: str, writer: str) -> str:
    """`acquire` in a bucket: create-if-absent, or swap out a dead holder's object (same generation only)."""
    me = json.dumps(_me()).encode()
    for _ in range(40):
        try:
            paths.write_if_generation(path, me, "0")
            return path
        except FileExistsError:
            pass
        generation = paths.generation(path)
        if generation is None:
            continue  # released meanwhile
        holder = _read(path)
        if holder is not None and not _dead(holder):
            raise _held_error(path, holder, directory, writer)
        try:
            paths.write_if_generation(path, me, generation)
        except FileExistsError:
            continue  # another process took it over first
        what = "an unreadable lock object" if holder is None else f"pid {holder['pid']} no longer runs"
        logger.warning("warning: took over the stale lock %s (%s)", path, what)
        return path
    raise LockHeldError(f"{path}: could not take the lock; likely cause: several {writer}s started on {directory}")


def release(path: str) -> None:
    """Removes the lock file if this process still holds it."""
    holder = _read(path)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        paths.remove(path)


@contextlib.contextmanager
def locked(directory: str, lock_name: str, writer: str) -> Iterator[str]:
    """`with locked(folder, name, writer):` holds the folder's lock for the block (see `acquire`)."""
    path = acquire(directory, lock_name, writer)
    try:
        yield path
    finally:
        release(path)
