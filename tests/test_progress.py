"""Progress displays: plain periodic lines in a log, a live bar on a terminal, nothing with -q; workers' posts
reach the driver through the board while a blocking call runs."""
import io
import logging
import time

import pytest

from pipelines.progress import BoardWatcher, ProgressBoard, ProgressDisplay, Throttle, clock


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_in_a_log_with_progress_eta_and_facts(caplog):
    with caplog.at_level(logging.INFO, logger="pipelines"):
        display = ProgressDisplay("training", 10, "batches", every=0.0, stream=io.StringIO())
        display.update(5, epoch="1/2", loss=0.25)
        display.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "pipelines.progress"]
    assert lines[0].startswith("training: 5/10 batches (50%), elapsed 0:00, ETA ?")   # no rate yet
    assert lines[0].endswith("epoch 1/2, loss 0.25") and len(lines) == 1     # closing repeats no line


def test_closing_logs_the_last_progress_once(caplog):
    """A display closed after updates its last line did not show logs where it ended; one whose last line
    already said it logs nothing more."""
    with caplog.at_level(logging.INFO, logger="pipelines"):
        display = ProgressDisplay("features", 4, "shards", every=3600, stream=io.StringIO())
        for done in range(1, 5):
            display.update(done, ticks=10 * done)
        display.close()
        done = ProgressDisplay("calibration", 1, "shards", every=3600, stream=io.StringIO())
        done.update(1, ticks=7)
        done.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "pipelines.progress"]
    assert [line.split(" (")[0] for line in lines] == ["features: 1/4 shards", "features: 4/4 shards",
                                                       "calibration: 1/1 shards"]
    assert lines[1].endswith("ticks 40")


def test_plain_lines_come_every_so_often_not_on_every_update(caplog):
    with caplog.at_level(logging.INFO, logger="pipelines"):
        display = ProgressDisplay("scoring", 100, "shards", every=3600, stream=io.StringIO())
        for done in range(1, 101):
            display.update(done)
    assert len([r for r in caplog.records if r.name == "pipelines.progress"]) == 1     # the first one only


def test_a_live_bar_on_a_terminal_and_nothing_when_quiet(caplog):
    terminal = Terminal()
    with caplog.at_level(logging.INFO, logger="pipelines"):
        display = ProgressDisplay("scoring", 4, "shards", stream=terminal)
        display.update(2, ticks=1234)
        display.note("[1/2] 2024-01-01: committed")
        display.close()
    shown = terminal.getvalue()
    assert "scoring:  50%" in shown and "2/4 shards" in shown and "ticks 1234" in shown
    assert "[1/2] 2024-01-01: committed" in shown and not caplog.records       # the bar, not log lines
    quiet = Terminal()
    with caplog.at_level(logging.WARNING, logger="pipelines"):                 # -q
        display = ProgressDisplay("scoring", 4, "shards", stream=quiet)
        display.update(2)
        display.close()
    assert quiet.getvalue() == ""


def test_the_eta_comes_from_the_rate_after_the_first_progress_not_the_start_up(monkeypatch):
    import pipelines.progress as progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    display = ProgressDisplay("training", 100, "batches", stream=io.StringIO())
    now[0] = 160.0                           # a minute of start-up before the first batch
    display.update(10)
    now[0] = 170.0                           # then 10 batches in 10 s
    display.update(20)
    assert display.eta() == pytest.approx(80.0)     # 80 batches left at 1 per second, start-up excluded
    display.update(100)
    assert display.eta() == 0.0


def test_throttle_and_clock():
    throttle = Throttle(3600)
    assert throttle() and not throttle()
    assert clock(75) == "1:15" and clock(3725) == "1:02:05" and clock(float("nan")) == "?"


def test_workers_posts_reach_the_driver_while_a_blocking_call_runs(local_ray):
    import ray

    @ray.remote(num_cpus=0)
    def work(board):
        board.post.remote("rank0", epoch=0, batch=1, loss=1.0)
        time.sleep(2.0)                                   # the driver reads the board meanwhile
        ray.get(board.post.remote("rank0", epoch=0, batch=2, loss=0.5))    # posted before the call returns
        return "done"

    board, seen = ProgressBoard.remote(), []
    with BoardWatcher(board, lambda posts: seen.append(posts.get("rank0")), period=0.1):
        assert ray.get(work.remote(board)) == "done"
    batches = [p["batch"] for p in seen if p]
    assert 1 in batches and batches[-1] == 2               # seen during the call, and the last post at the end
    ray.kill(board)


@pytest.mark.parametrize("total", [0, 1])
def test_a_display_of_nothing_does_not_divide_by_zero(total, caplog):
    with caplog.at_level(logging.INFO, logger="pipelines"):
        display = ProgressDisplay("scoring", total, "shards", every=0.0, stream=io.StringIO())
        display.update(0)
        display.close()
    assert "ETA ?" in caplog.records[0].getMessage()
