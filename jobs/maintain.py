"""`python -m jobs.maintain`: the same as `dmafn maintain` (a `ray job submit` target)."""
from jobs.cli import run

if __name__ == "__main__":
    run(verb="maintain")
