"""`python -m jobs.generate`: the same as `dmafn generate` (a `ray job submit` target)."""
import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(verb="generate"))
