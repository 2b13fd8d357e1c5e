"""`python -m jobs.train`: the same as `dmafn train` (a `ray job submit` target)."""
from jobs.cli import run

if __name__ == "__main__":
    run(verb="train")
