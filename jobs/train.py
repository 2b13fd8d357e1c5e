"""`python -m jobs.train`: the same as `dmafn train` (a `ray job submit` target)."""
import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(verb="train"))
