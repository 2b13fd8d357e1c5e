"""CPU pinning for scoring tasks: one task, one core.

Ray gives a task `num_cpus=1` as a count, not as a core: the OS moves the task's threads (its own, Polars',
Arrow's, the Delta writer's) across every core, and two tasks on a 2-core machine then share caches and wait on
each other's threads. Measured on this project's 2-vCPU machine, two shards scored at once took 4.1 s each
unpinned and 3.8 s each with every thread of each process held to its own core.

`pinned_to_free_cpu` claims one of the cores this process may use - the one the OS runs it on when free,
else the next free one - by locking a file per core in the machine's temp folder (so tasks of different Ray
workers, jobs or nodes on one machine never share a core), holds every thread of the process to it, and
restores the threads' affinity and releases the core on exit. It does
nothing where the OS has no per-thread affinity (only Linux has it), where the process may use one core only, or
when every core is claimed already (more tasks than cores: the OS places them).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from typing import IO, Iterator

PIN_ENV = "DMAFN_PIN_CPUS"      # "0" turns pinning off (read by the job's driver, passed to its tasks)


def pinning_enabled() -> bool:
    """Whether scoring tasks pin themselves (on unless DMAFN_PIN_CPUS=0)."""
    return os.environ.get(PIN_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return []


def _current_cpu() -> int | None:
    """The core this thread last ran on (field 39 of /proc/thread-self/stat), or None where it cannot be read."""
    try:
        with open("/proc/thread-self/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return None


def _claim(cpus: list[int], folder: str) -> tuple[int, IO] | None:
    """The first of `cpus` whose lock file no other process holds, with the open (locked) file."""
    for cpu in cpus:
        path = os.path.join(folder, f"dmafn-cpu-{cpu}.lock")
        try:                         # an existing file is opened without O_CREAT: in a sticky temp folder Linux
            fd = os.open(path, os.O_RDWR)                   # refuses O_CREAT on another user's file
        except FileNotFoundError:
            try:                     # writable by every user of the machine: their tasks share its cores
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError:
                continue
        except OSError:              # a read-only folder, a file another user made private: not ours to take
            continue
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o666)     # past the umask (only the file's owner can; others find it so already)
        handle = os.fdopen(fd, "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        return cpu, handle
    return None


def _claim_for_this_process(folder: str) -> tuple[int, IO] | None:
    """A free core for this process and its lock, or None where pinning cannot help: no per-thread affinity
    (not Linux), one core allowed, or every allowed core held. The core the OS placed this task on comes first
    (no move, and likely idle), then the others in order."""
    if not hasattr(os, "sched_setaffinity") or not _threads():
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None
    here = _current_cpu()
    if here in allowed:
        allowed = allowed[allowed.index(here):] + allowed[:allowed.index(here)]
    return _claim(allowed, folder)


@contextlib.contextmanager
def pinned_to_free_cpu(enabled: bool = True, *, lock_folder: str | None = None) -> Iterator[int | None]:
    """Hold every thread of this process to one free core for the duration; yields the core, or None when
    nothing was pinned (disabled, unsupported, one core only, or none free). Threads started inside inherit the
    core; on exit every thread gets back the affinity the process had."""
    claimed = _claim_for_this_process(lock_folder or tempfile.gettempdir()) if enabled else None
    if claimed is None:
        yield None
        return
    cpu, handle = claimed
    allowed, before = os.sched_getaffinity(0), {}
    try:
        for tid in _threads():
            with contextlib.suppress(OSError):          # a thread that ended meanwhile
                before[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, {cpu})
        yield cpu
    finally:
        for tid in _threads():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, before.get(tid, allowed))
        handle.close()                                  # releases the lock
