"""Scoring tasks pin themselves to one free core (pipelines.affinity): distinct cores per holder, every thread
pinned, everything restored on exit, nothing done when off or when no core is free."""
from __future__ import annotations

import contextlib
import os
import threading

import pytest

from pipelines.affinity import PIN_ENV, _claim, _current_cpu, pinned_to_free_cpu, pinning_enabled

linux_only = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc/self/task"),
                                reason="per-thread CPU affinity is Linux only")


def _affinities() -> dict[int, set[int]]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            out[int(tid)] = os.sched_getaffinity(int(tid))
    return out


@linux_only
def test_a_task_takes_a_core_no_one_holds_pins_every_thread_and_restores_them(tmp_path):
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("this process may use one core only: pinning is a no-op (tested below)")
    before = _affinities()
    release, started = threading.Event(), threading.Event()
    seen: dict[str, set[int]] = {}

    def worker():                      # a thread started while pinned inherits the core
        seen["thread"] = os.sched_getaffinity(0)
        started.set()
        release.wait(10)

    others = [_claim([cpu], str(tmp_path)) for cpu in allowed[:-1]]     # other tasks hold every core but the last
    try:
        with pinned_to_free_cpu(lock_folder=str(tmp_path)) as cpu:
            assert cpu == allowed[-1]
            assert all(a == {cpu} for a in _affinities().values())      # every thread of the process
            t = threading.Thread(target=worker)
            t.start()
            started.wait(10)
            assert seen["thread"] == {cpu}
            with pinned_to_free_cpu(lock_folder=str(tmp_path)) as extra:
                assert extra is None                      # no core free (nor more than one allowed now)
        after = _affinities()
        assert all(after[tid] == before[tid] for tid in before if tid in after)
        assert after[t.native_id] == set(allowed)         # the thread started inside gets the process's set back
        release.set()
        t.join()
        others[-1][1].close()                             # one other task ends, another takes the last core:
        last = _claim([allowed[-1]], str(tmp_path))       # the ended task's core is the only free one
        with pinned_to_free_cpu(lock_folder=str(tmp_path)) as cpu:
            assert cpu == others[-1][0]
        with pinned_to_free_cpu(lock_folder=str(tmp_path)) as cpu:
            assert cpu == others[-1][0]                   # released on exit, taken again
        last[1].close()
    finally:
        release.set()
        for claimed in others:
            claimed[1].close()
    others = [_claim([cpu], str(tmp_path)) for cpu in allowed]           # every core held: not pinned
    with pinned_to_free_cpu(lock_folder=str(tmp_path)) as cpu:
        assert cpu is None and os.sched_getaffinity(0) == set(allowed)
    for claimed in others:
        claimed[1].close()


@linux_only
def test_an_error_inside_releases_the_core_and_restores_affinity(tmp_path):
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("one core only")
    with pytest.raises(RuntimeError, match="boom"):
        with pinned_to_free_cpu(lock_folder=str(tmp_path)) as cpu:
            assert os.sched_getaffinity(0) == {cpu}
            raise RuntimeError("boom")
    assert os.sched_getaffinity(0) == allowed
    with pinned_to_free_cpu(lock_folder=str(tmp_path)) as cpu:
        assert cpu in allowed                             # the core is free again


def test_off_or_unusable_does_nothing(tmp_path, monkeypatch):
    before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    with pinned_to_free_cpu(False, lock_folder=str(tmp_path)) as cpu:
        assert cpu is None
        if before is not None:
            assert os.sched_getaffinity(0) == before
    assert not list(tmp_path.iterdir())                   # no lock taken
    with pinned_to_free_cpu(lock_folder=str(tmp_path / "missing")) as cpu:
        assert cpu is None                                # no lock folder: not pinned, no error
    if before is not None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
        with pinned_to_free_cpu(lock_folder=str(tmp_path)) as cpu:
            assert cpu is None                            # one core allowed: nothing to choose


@pytest.mark.parametrize("value, expected", [(None, True), ("1", True), ("0", False), ("off", False),
                                             ("false", False), (" No ", False)])
def test_pinning_is_on_unless_turned_off(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(PIN_ENV, raising=False)
    else:
        monkeypatch.setenv(PIN_ENV, value)
    assert pinning_enabled() is expected


def test_lock_files_are_shared_by_every_user_of_the_machine(tmp_path):
    """Tasks of other users (another job's workers) take the same cores: the lock files are writable by all,
    whatever the umask; a file already there is opened as it is."""
    old = os.umask(0o077)
    try:
        cpu, handle = _claim([0], str(tmp_path))
        handle.close()
    finally:
        os.umask(old)
    lock = tmp_path / f"dmafn-cpu-{cpu}.lock"
    assert lock.stat().st_mode & 0o777 == 0o666
    again = _claim([0], str(tmp_path))
    assert again is not None and again[0] == 0
    again[1].close()


@linux_only
def test_a_task_keeps_the_core_it_runs_on_when_that_core_is_free(tmp_path, monkeypatch):
    import pipelines.affinity as affinity

    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("one core only")
    os.sched_setaffinity(0, {allowed[1]})
    try:
        assert _current_cpu() == allowed[1]               # read from /proc: where the OS runs this thread
    finally:
        os.sched_setaffinity(0, set(allowed))
    for here in allowed[:2]:
        monkeypatch.setattr(affinity, "_current_cpu", lambda: here)
        with pinned_to_free_cpu(lock_folder=str(tmp_path)) as got:
            assert got == here                            # taken first, as no other task holds it
