"""`python -m jobs.enroll`: the same as `dmafn enroll` (a `ray job submit` target)."""
from jobs.cli import run

if __name__ == "__main__":
    run(verb="enroll")
