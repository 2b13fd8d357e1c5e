"""`ray_session` without a cluster: what it asks of a local Ray."""
import json
import os
import subprocess
import sys
import textwrap

import ray

from pipelines import ray_runtime


def test_a_local_session_sends_no_usage_statistics_unless_the_user_says_so(monkeypatch):
    """Also the workers' allocator setting: the project's unless the user set one."""
    seen = []
    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED", raising=False)
    monkeypatch.delenv("_RJEM_MALLOC_CONF", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append((os.environ.get("RAY_USAGE_STATS_ENABLED"),
                                                                os.environ.get("_RJEM_MALLOC_CONF"),
                                                                kw.get("num_cpus"))))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray_runtime, "_stop_autoscaler_monitor", lambda: None)
    with ray_runtime.ray_session(num_cpus=1):
        pass
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")
    monkeypatch.setenv("_RJEM_MALLOC_CONF", "dirty_decay_ms:0")
    with ray_runtime.ray_session(num_cpus=1):
        pass
    assert seen == [("0", ray_runtime.WORKER_JEMALLOC_CONF, 1), ("1", "dirty_decay_ms:0", 1)]


def test_a_local_session_stops_its_autoscaler_monitor_before_ray_shuts_down(tmp_path):
    """Ray's shutdown stops the GCS first; a monitor still running then waits out a 1 s grace to report its own
    end. A real local Ray in its own process (the test session's Ray is already up here); its workers also
    start with the project's allocator setting."""
    script = textwrap.dedent("""
        import json, os, ray
        from ray._private import ray_constants
        from pipelines import ray_runtime
        seen, shutdown = {}, ray.shutdown
        def watching_shutdown(*args, **kwargs):
            node = ray._private.worker._global_node
            seen["monitor_left"] = [info.process.poll() is None
                                    for info in node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, [])]
            seen["raylet_alive"] = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.poll() is None
            shutdown(*args, **kwargs)
        ray.shutdown = watching_shutdown
        with ray_runtime.ray_session(num_cpus=1):
            node = ray._private.worker._global_node
            seen["monitor_started"] = ray_constants.PROCESS_TYPE_MONITOR in node.all_processes
            seen["task"] = ray.get(ray.remote(lambda: 41 + 1).remote())
            seen["worker_jemalloc"] = ray.get(ray.remote(lambda: os.environ.get("_RJEM_MALLOC_CONF")).remote())
        print(json.dumps(seen))
    """)
    env = {**{k: v for k, v in os.environ.items() if k != "_RJEM_MALLOC_CONF"}, "RAY_ADDRESS": "",
           "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"monitor_started": True, "task": 42, "monitor_left": [], "raylet_alive": True,
                    "worker_jemalloc": ray_runtime.WORKER_JEMALLOC_CONF}     # the workers inherit it


def test_the_process_entry_point_runs_exit_handlers_flushes_and_keeps_the_exit_code():
    """`jobs.cli.run` skips the interpreter's teardown, not what a command registered or printed."""
    script = textwrap.dedent("""
        import atexit, logging, sys
        import jobs.cli as cli
        atexit.register(lambda: print("handler ran"))
        def main(argv=None, verb=None):
            print("printed, unflushed", end="")
            sys.stderr.write(f"verb {verb}")
            return 3
        cli.main = main
        cli.run(verb="score")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert (done.returncode, done.stdout, done.stderr) == (3, "printed, unflushedhandler ran\n", "verb score")
