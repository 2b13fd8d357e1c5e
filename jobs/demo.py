"""`python -m jobs.demo`: the same as `dmafn demo` (a `ray job submit` target)."""
import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(verb="demo"))
