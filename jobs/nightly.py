"""`python -m jobs.nightly SPEC [--date D]`: the nightly job, scoring yesterday (UTC) by default."""
import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(verb="score"))
