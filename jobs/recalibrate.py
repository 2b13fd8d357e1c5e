"""`python -m jobs.recalibrate`: the same as `dmafn recalibrate` (a `ray job submit` target)."""
from jobs.cli import run

if __name__ == "__main__":
    run(verb="recalibrate")
