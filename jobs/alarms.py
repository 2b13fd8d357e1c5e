"""`python -m jobs.alarms SPEC [--date D | --start D --end D] [--json]`: the alarm events of scored dates."""
from jobs.cli import run

if __name__ == "__main__":
    run(verb="alarms")
