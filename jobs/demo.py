"""`python -m jobs.demo`: the same as `dmafn demo` (a `ray job submit` target)."""
from jobs.cli import run

if __name__ == "__main__":
    run(verb="demo")
