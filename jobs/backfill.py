"""`python -m jobs.backfill`: the same as `dmafn backfill` (a `ray job submit` target)."""
from jobs.cli import run

if __name__ == "__main__":
    run(verb="backfill")
