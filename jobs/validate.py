"""`python -m jobs.validate`: the same as `dmafn validate` (a `ray job submit` target)."""
from jobs.cli import run

if __name__ == "__main__":
    run(verb="validate")
