"""`python -m jobs.score`: the same as `dmafn score` (a `ray job submit` target)."""
from jobs.cli import run

if __name__ == "__main__":
    run(verb="score")
