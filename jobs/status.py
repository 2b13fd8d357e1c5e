"""`python -m jobs.status`: the same as `dmafn status` (a `ray job submit` target)."""
from jobs.cli import run

if __name__ == "__main__":
    run(verb="status")
