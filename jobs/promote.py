"""`python -m jobs.promote`: the same as `dmafn promote` (a `ray job submit` target)."""
from jobs.cli import run

if __name__ == "__main__":
    run(verb="promote")
