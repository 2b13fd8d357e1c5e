"""`python -m jobs.evaluate`: the same as `dmafn evaluate` (a `ray job submit` target)."""
from jobs.cli import run

if __name__ == "__main__":
    run(verb="evaluate")
