"""`python -m jobs.report`: the same as `dmafn report` (a `ray job submit` target)."""
from jobs.cli import run

if __name__ == "__main__":
    run(verb="report")
