"""`python -m jobs.generate`: the same as `dmafn generate` (a `ray job submit` target)."""
from jobs.cli import run

if __name__ == "__main__":
    run(verb="generate")
