"""Progress of the long steps (training epochs, backfill passes), shown on the driver.

Training's rank 0 posts a few numbers to a `ProgressBoard` actor (fire-and-forget, throttled) that a
`BoardWatcher` thread reads; scoring tasks stream theirs to the driver with their results (`pipelines.score`).
Either way the driver shows one display per step: a live tqdm bar when stderr is a terminal, a plain log line
every `every` seconds otherwise (a job's log, `ray job logs`). Nothing is shown with `-q` (the `pipelines`
logger above INFO).
"""
from __future__ import annotations

import logging
import math
import sys
import threading
import time
from typing import Any, Callable

import ray

log = logging.getLogger("pipelines.progress")


@ray.remote(num_cpus=0)
class ProgressBoard:
    """The latest numbers each worker (rank, shard) posted."""

    def __init__(self) -> None:
        self.posts: dict[str, dict[str, Any]] = {}

    def post(self, key: str, **values: Any) -> None:
        self.posts[key] = values

    def read(self) -> dict[str, dict[str, Any]]:
        return self.posts


class Throttle:
    """True at most once per `seconds` (and on the first call): workers post without flooding the board."""

    def __init__(self, seconds: float = 1.0) -> None:
        self.seconds, self.last = seconds, -float("inf")

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.seconds:
            self.last = now
            return True
        return False


class ProgressDisplay:
    """One progress display: `update(done, **facts)` with `done` in units of `total`; `close()` at the end."""

    def __init__(self, title: str, total: int, unit: str, *, every: float = 10.0, stream=None) -> None:
        self.title, self.total, self.unit, self.every = title, max(int(total), 1), unit, every
        self.stream = stream or sys.stderr
        self.enabled = logging.getLogger("pipelines").isEnabledFor(logging.INFO)
        # -inf: the first update always shows (0.0 hid it on a machine up for less than `every` seconds)
        self.started, self.last_line, self.done, self.facts = time.monotonic(), -math.inf, 0.0, {}
        self.first: tuple[float, float] | None = None      # (time, done) of the first progress: the rate's origin
        self.bar, self.shown = None, None       # shown: the (done, facts) of the last line logged
        if self.enabled and _is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=title, unit=unit, file=self.stream, dynamic_ncols=True,
                            leave=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} {unit} "
                                                   "[{elapsed}<{remaining}]{postfix}")

    def update(self, done: float, **facts: Any) -> None:
        self.done, self.facts = min(float(done), self.total), facts
        if self.first is None and self.done > 0:
            self.first = (time.monotonic(), self.done)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = self.done
            self.bar.set_postfix_str(_facts(facts), refresh=False)
            self.bar.refresh()
        elif time.monotonic() - self.last_line >= self.every:
            self._line()

    def note(self, message: str) -> None:
        """A line of its own above the bar (or in the log)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            log.info("%s", message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.shown != (self.done, self.facts):      # not the line just logged again
            self._line()

    def _line(self) -> None:
        self.last_line, self.shown = time.monotonic(), (self.done, dict(self.facts))
        elapsed = self.last_line - self.started
        eta = self.eta()
        log.info("%s: %.0f/%d %s (%.0f%%), elapsed %s, ETA %s%s", self.title, self.done, self.total, self.unit,
                 100 * self.done / self.total, clock(elapsed), clock(eta),
                 f" - {_facts(self.facts)}" if self.facts else "")


    def eta(self) -> float:
        """Seconds left at the rate seen since the first progress (start-up time, e.g. Ray Train's, excluded);
        NaN until there is a rate."""
        if self.done >= self.total:
            return 0.0
        if self.first is None or self.done <= self.first[1]:
            return float("nan")
        rate = (self.done - self.first[1]) / max(time.monotonic() - self.first[0], 1e-9)
        return (self.total - self.done) / rate


class BoardWatcher:
    """A driver thread that reads a board every `period` seconds and hands the posts to `show` while a blocking
    call (Ray Train's `fit`) runs: `with BoardWatcher(board, show): trainer.fit()`."""

    def __init__(self, board, show: Callable[[dict[str, dict[str, Any]]], None], period: float = 0.5) -> None:
        self.board, self.show, self.period = board, show, period
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def __enter__(self) -> "BoardWatcher":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self._read()

    def _run(self) -> None:
        while not self.stop.wait(self.period):
            self._read()

    def _read(self) -> None:
        try:
            self.show(ray.get(self.board.read.remote(), timeout=5))
        except Exception:  # noqa: BLE001 - a progress display never fails the job
            pass


def clock(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60:d}:{seconds % 60:02d}"


def _facts(facts: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in facts.items())


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
