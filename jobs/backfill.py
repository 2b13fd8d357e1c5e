"""`python -m jobs.backfill`: the same as `dmafn backfill` (a `ray job submit` target)."""
import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(verb="backfill"))
