"""Starting, sizing and stopping Ray. Every Ray call that depends on the cluster's size lives here.

Sizing avoids a CPU-starvation hang: on a small cluster, Train workers (or actors) holding every CPU leave
none for the tasks a job still submits (the progress board, a retried task) and it waits forever, so they take
fractional CPUs; sizes come from the cluster, never from constants.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Iterator

import ray

log = logging.getLogger(__name__)

# Polars' allocator (jemalloc, read from this variable when a process starts) returns freed pages to the OS
# within moments by default, so a worker scoring date after date faults the same memory in again each batch:
# measured, ~140 k page faults and ~8 % of a shard task's CPU per date. Kept 30 s, freed pages are reused by the
# next batch and still go back to the OS once a worker idles. Set for the local Ray's processes (the images set
# it for a cluster's); a value the user set wins.
WORKER_JEMALLOC_CONF = "dirty_decay_ms:30000,muzzy_decay_ms:30000"


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None, verbose: bool = False
                ) -> Iterator[None]:
    """Connect to `address` (or RAY_ADDRESS); else start a small local Ray. Always shut down afterwards.

    The console shows the job's own lines: what Ray's workers and actors print (Train reports, Ray's own
    warnings) stays in Ray's log files under its session folder unless `verbose`."""
    address = address or os.environ.get("RAY_ADDRESS")
    already = ray.is_initialized()
    level = logging.WARNING if verbose else logging.ERROR
    if not verbose:                        # Ray's deprecation notices about its own internals
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\.|$)")
    if not already:
        if address:
            ray.init(address=address, logging_level=level, log_to_driver=verbose)
        else:
            # a local Ray lives for this one command: it sends no usage statistics (Ray's default is to report
            # them) unless the user's environment says otherwise; measured, it also starts ~0.4 s sooner
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            os.environ.setdefault("_RJEM_MALLOC_CONF", WORKER_JEMALLOC_CONF)   # inherited by Ray's workers
            cpus = num_cpus or os.cpu_count() or 2
            ray.init(num_cpus=cpus, include_dashboard=False, logging_level=level,
                     object_store_memory=_object_store_bytes(), configure_logging=True, log_to_driver=verbose,
                     _system_config={"automatic_object_spilling_enabled": True})
    try:
        yield
    finally:
        if not already:
            if not address:                    # the local Ray this session started
                _stop_autoscaler_monitor()
            ray.shutdown()


def _stop_autoscaler_monitor() -> None:
    """Stop the local Ray's autoscaler monitor before `ray.shutdown`.

    A local Ray has no autoscaling config, so its monitor keeps no state worth a graceful exit. Ray's shutdown
    stops the GCS before the monitor, whose SIGTERM handler then reports its own end to the gone GCS and is
    killed after Ray's 1 s grace: a second of every command's wall time (measured: shutdown 1.35 s -> ~0.3 s).
    Private Ray API: where it has moved, shutdown simply takes the long way."""
    try:
        from ray._private import ray_constants
        node = ray._private.worker._global_node
        if node is not None and ray_constants.PROCESS_TYPE_MONITOR in node.all_processes:
            node._kill_process_type(ray_constants.PROCESS_TYPE_MONITOR, check_alive=False, allow_graceful=False)
    except Exception as exc:  # pragma: no cover - only when Ray's internals differ from the pinned version
        log.debug("autoscaler monitor not stopped early: %s", exc)


def machine_memory_bytes() -> int:
    """This machine's physical memory (8 GiB when the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30


def _object_store_bytes() -> int:
    return int(min(max(machine_memory_bytes() * 0.15, 512 << 20), 4 << 30))


@dataclass(frozen=True)
class Resources:
    cpus: float
    gpus: float

    @classmethod
    def current(cls) -> "Resources":
        res = ray.cluster_resources()
        return cls(cpus=float(res.get("CPU", 1)), gpus=float(res.get("GPU", 0)))

    def train_worker_cpus(self, workers: int) -> float:
        """CPUs per Train worker, leaving at least a quarter of the cluster free (see the module docstring)."""
        return max(0.25, min(1.0, self.cpus * 0.75 / max(workers, 1)))


@contextlib.contextmanager
def task_error_as_itself():
    """Inside it, a Ray task's own error (a DataError naming a file, ...) is raised as itself rather than
    wrapped in Ray's traceback; Ray's own errors (a lost worker, ...) are raised as they are."""
    try:
        yield
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, Exception) and not isinstance(cause, ray.exceptions.RayError):
            raise cause from None
        raise


def raise_task_error(ref: "ray.ObjectRef"):
    """`ray.get(ref)`, a task's own error raised as itself (`task_error_as_itself`)."""
    with task_error_as_itself():
        return ray.get(ref)
