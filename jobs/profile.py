"""`python -m jobs.profile`: the same as `dmafn profile` (a `ray job submit` target)."""
from jobs.cli import run

if __name__ == "__main__":
    run(verb="profile")
