"""`python -m jobs.maintain`: the same as `dmafn maintain` (a `ray job submit` target)."""
import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(verb="maintain"))
