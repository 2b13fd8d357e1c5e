"""`python -m jobs.nightly SPEC [--date D]`: the nightly job, scoring yesterday (UTC) by default."""
from jobs.cli import run

if __name__ == "__main__":
    run(verb="score")
