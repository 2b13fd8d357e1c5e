"""`python -m jobs.validate`: the same as `dmafn validate` (a `ray job submit` target)."""
import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(verb="validate"))
