"""`python -m jobs.evaluate`: the same as `dmafn evaluate` (a `ray job submit` target)."""
import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(verb="evaluate"))
