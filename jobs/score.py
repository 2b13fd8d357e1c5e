"""`python -m jobs.score`: the same as `dmafn score` (a `ray job submit` target)."""
import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(verb="score"))
