"""`python -m jobs.profile`: the same as `dmafn profile` (a `ray job submit` target)."""
import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(verb="profile"))
