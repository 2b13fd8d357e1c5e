"""`python -m jobs.nightly SPEC [--date D]`: the nightly job, scoring yesterday (in the spec's `timezone`, UTC unless it says) by default."""
from jobs.cli import run

if __name__ == "__main__":
    run(verb="score")
