"""`python -m jobs.alarms SPEC [--date D | --start D --end D] [--json] [--min-ticks N]`: the alarm events of scored
dates (a `ray job submit` target, though it needs no Ray)."""
from jobs.cli import run

if __name__ == "__main__":
    run(verb="alarms")
