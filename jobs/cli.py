"""`dmafn` command line: parse, call pipelines/, report, exit. Each verb is also `python -m jobs.<verb>`."""
from __future__ import annotations

import argparse
import atexit
import datetime as dt
import logging
import os
import sys
import traceback
from typing import Callable, NoReturn

from dmafn.spec import SpecError, load_spec
from pipelines.storage import BackfillError, DataError, Interrupted


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None


def _positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type: a number of `kind` above zero, else a usage error naming the value."""
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {kind.__name__}")
        return value
    return parse


def _tick_counts(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated whole numbers above zero ('30,60'), else a usage error naming the value."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of positive whole numbers (as in 30,60)")
    return tuple(int(p) for p in parts)


def _yesterday(zone: str) -> dt.date:
    """Yesterday in the spec's `timezone` (the nightly's default date)."""
    from dmafn.spec import local_today
    return local_today(zone) - dt.timedelta(days=1)


def cmd_demo(args) -> None:
    from dmafn.synthetic import SyntheticConfig
    from pipelines.demo import run_demo
    from pipelines.ray_runtime import ray_session

    cfg = SyntheticConfig(entities=args.entities, days=args.days, clean_days=args.train_days, seed=args.seed)
    with ray_session(args.address, verbose=args.verbose):
        run_demo(args.workdir, cfg, epochs=args.epochs, baselines=not args.no_baselines)


def cmd_generate(args) -> None:
    from dmafn.synthetic import SyntheticConfig
    from pipelines.generate import write_synthetic

    cfg = SyntheticConfig(entities=args.entities, days=args.days, clean_days=args.train_days, seed=args.seed,
                          audio=args.audio, shifted=args.shifted, slow_drifts=args.slow_drifts,
                          gradual=args.gradual, outages=args.outages, ac_vibration=args.ac_vibration,
                          dead_channels=args.dead_channels, stops=args.stops)
    print(f"spec: {write_synthetic(args.dir, cfg)}")


def cmd_validate(args) -> None:
    import json

    from dmafn.spec import parse_spec, read_spec_yaml
    from dmafn.spec_schema import spec_json_schema, spec_problems

    if args.schema:
        print(json.dumps(spec_json_schema(), indent=2))
        return
    if not args.spec:
        raise SpecError("validate: give a spec file (or --schema)")
    data = read_spec_yaml(args.spec)
    problems = spec_problems(data, source=args.spec)
    if problems:
        raise SpecError(f"{len(problems)} problem(s):\n" + "\n".join(f"  {p}" for p in problems))
    spec = parse_spec(data, source=args.spec)
    print(f"{args.spec}: valid spec '{spec.name}' with modalities {', '.join(spec.modalities)}")
    if args.check_data:
        from pipelines.check_data import check_data

        found = check_data(spec)
        for data in found:
            print("\n".join(data.lines()))
        problems = [p for data in found for p in data.problems]
        if problems:
            raise DataError(f"{len(problems)} data problem(s):\n" + "\n".join(f"  {p}" for p in problems))


def cmd_train(args) -> None:
    from pipelines.ray_runtime import ray_session
    from pipelines.train import train

    spec = load_spec(args.spec)
    with ray_session(args.address, verbose=args.verbose):
        version = train(spec, promote=not args.no_promote)
    print(f"model version: {version}" + (f" (not promoted: LATEST is unchanged; dmafn promote {args.spec} {version})"
                                         if args.no_promote else ""))


def cmd_promote(args) -> None:
    from pipelines.registry import Registry
    from pipelines.score import reading_spec
    from pipelines.storage import Storage

    spec = load_spec(args.spec)
    storage = Storage.from_spec(spec.storage)
    before, mv = Registry(spec.registry, storage).promote(args.model_version, check=lambda v: reading_spec(v, spec))
    days = mv.manifest.get("training_window", {}).get("train_days", [])
    trained = f" (trained on {days[0]} .. {days[-1]})" if days else ""
    if before == mv.version:
        print(f"LATEST already names {mv.version}{trained}: nothing changed")
        return
    print(f"LATEST: {before or '(none)'} -> {mv.version}{trained}. Scoring uses it from now on; dates scored by "
          f"another version are rescored by dmafn backfill {args.spec} --start D --end D")


def cmd_enroll(args) -> None:
    from pipelines.enroll import enroll, enrolment_lines
    from pipelines.ray_runtime import ray_session

    spec = load_spec(args.spec)
    with ray_session(args.address, verbose=args.verbose):
        enrolment = enroll(spec, args.start, args.end, version=args.model, promote=not args.no_promote)
    print("\n".join(enrolment_lines(enrolment, args.start, args.end)))


def cmd_recalibrate(args) -> None:
    from pipelines.ray_runtime import ray_session
    from pipelines.recalibrate import recalibrate, recalibration_lines

    spec = load_spec(args.spec)
    with ray_session(args.address, verbose=args.verbose):
        done = recalibrate(spec, version=args.model, start=args.start, end=args.end, promote=not args.no_promote)
    print("\n".join(recalibration_lines(done)))


def cmd_score(args) -> None:
    from pipelines.ray_runtime import ray_session
    from pipelines.score import score_date, skipped_line

    spec = load_spec(args.spec)
    with ray_session(args.address, verbose=args.verbose):
        r = score_date(spec, args.date or _yesterday(spec.timezone), version=args.model)
    print(skipped_line(r.date) if r.skipped else f"{r.date}: {r.ticks_in} ticks = {r.rows_scored} scored + "
          f"{r.rows_quarantined} quarantined; {r.anomalies} anomalies -> {spec.score.output}")


def cmd_backfill(args) -> None:
    from pipelines.ray_runtime import ray_session
    from pipelines.score import backfill, backfill_dry_run, skipped_line

    spec = load_spec(args.spec)
    if args.dry_run:                                   # listings and the output's log only: no Ray
        print("\n".join(backfill_dry_run(spec, args.start, args.end, version=args.model, force=args.force,
                                          skip_changed=args.skip_changed, parallel=args.parallel,
                                          days_per_shard=args.days_per_shard, shard_bytes=int(args.shard_mb * 1e6))))
        return
    with ray_session(args.address, verbose=args.verbose):
        results = backfill(spec, args.start, args.end, version=args.model, force=args.force,
                           skip_changed=args.skip_changed, parallel=args.parallel, days_per_shard=args.days_per_shard,
                           shard_bytes=int(args.shard_mb * 1e6))
    for r in results:
        print(skipped_line(r.date) if r.skipped else f"{r.date}: {r.ticks_in} ticks = {r.rows_scored} scored + "
              f"{r.rows_quarantined} quarantined; {r.anomalies} anomalies")


def cmd_evaluate(args) -> None:
    from pipelines.evaluate import evaluate
    from pipelines.ray_runtime import ray_session

    spec = load_spec(args.spec)
    with ray_session(args.address, verbose=args.verbose):      # each date read and tallied by a task
        evaluate(spec, start=args.start, end=args.end, report_dir=args.report, baselines=args.baselines,
                 min_ticks=args.min_ticks)


def cmd_alarms(args) -> None:
    from pipelines.alarms import alarm_events

    spec = load_spec(args.spec)
    found = alarm_events(spec, start=args.date or args.start, end=args.date or args.end, min_ticks=args.min_ticks)
    print(found.json_lines() if args.json else found.text())


def cmd_report(args) -> None:
    from pipelines.ray_runtime import ray_session
    from pipelines.report import build_report

    spec = load_spec(args.spec)
    entities = [e.strip() for e in args.entities.split(",") if e.strip()] if args.entities else None
    with ray_session(args.address, verbose=args.verbose):      # each date read and tallied by a task
        path = build_report(spec, args.out, start=args.start, end=args.end, entities=entities, top_events=args.top,
                            min_ticks=args.min_ticks)
    print(f"report: {path}")


def cmd_profile(args) -> None:
    from pipelines.profile import profile
    from pipelines.ray_runtime import ray_session

    spec = load_spec(args.spec)
    with ray_session(args.address, verbose=args.verbose):
        table = profile(spec, args.start, args.end)
    import polars as pl

    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200):
        print(table)
    if args.out:
        table.write_parquet(args.out)
        print(f"profile written to {args.out}")


def cmd_maintain(args) -> None:
    from pipelines.maintain import maintain

    spec = load_spec(args.spec)
    for line in maintain(spec, retention_hours=args.retention_hours):
        print(line)


def cmd_status(args) -> int:
    from pipelines.status import scoring_status
    from pipelines.storage import Storage

    spec = load_spec(args.spec)
    found = scoring_status(spec, Storage.from_spec(spec.storage), days=args.days, max_age_days=args.max_age_days,
                           spec_path=args.spec)
    if args.json:
        import json

        print(json.dumps(found.as_dict(), indent=2, default=str))
    else:
        print(found.text())
    return 1 if args.check and found.problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmafn", description="Deep Multi-Modal Anomaly Fusion Network",
        epilog="On a lake of your own: validate SPEC --check-data, profile, train, backfill, then alarms, report and "
               "status; score every night (README: 'Your own data, step by step').")
    parser.add_argument("--version", action="version", version=f"dmafn {_version()}")
    sub = parser.add_subparsers(dest="verb", required=True)

    def verb(name: str, fn: Callable, help_: str, spec: bool | str = True) -> argparse.ArgumentParser:
        """A verb's parser with the common options; `spec`: True (required), False, or "?" (optional)."""
        p = sub.add_parser(name, help=help_)
        if spec:
            p.add_argument("spec", nargs=None if spec is True else spec, help="pipeline spec YAML")
        p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
        quiet = p.add_mutually_exclusive_group()
        quiet.add_argument("-v", "--verbose", action="store_true", help="Ray's own output and tracebacks too")
        quiet.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
        p.set_defaults(fn=fn)
        return p

    p = verb("demo", cmd_demo, "generate, train, backfill, evaluate, report, status, alarms: all local", spec=False)
    p.add_argument("--workdir", default="demo_workdir")
    p.add_argument("--entities", type=int, default=4)
    p.add_argument("--days", type=int, default=6)
    p.add_argument("--train-days", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baselines", action="store_true", help="skip training each modality alone")
    p = verb("generate", cmd_generate, "write a synthetic multi-modal data set and its spec", spec=False)
    p.add_argument("dir")
    p.add_argument("--entities", type=int, default=4)
    p.add_argument("--days", type=int, default=6)
    p.add_argument("--train-days", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--audio", action="store_true",
                   help="add a microphone (audio) modality, and a fault only it hears (squeal)")
    fleet = p.add_mutually_exclusive_group()
    fleet.add_argument("--shifted", action="store_true",
                       help="the evaluation-only fleet: other machines and anomaly shapes (never tune on it)")
    fleet.add_argument("--slow-drifts", action="store_true",
                       help="the demo's machines with slow drifts as a sixth anomaly kind (a fleet to choose settings on)")
    fleet.add_argument("--gradual", action="store_true",
                       help="the demo's machines with slow drifts, intermittent vibration and camera fades as kinds "
                            "six to eight (a fleet to choose settings for gradual faults on)")
    p.add_argument("--outages", action="store_true",
                   help="each pump's vibration sensor fails for 2-4 hours once on a scored day, unlabelled (the "
                        "shifted fleet always has it): how scores hold while a modality is gone")
    p.add_argument("--dead-channels", action="store_true",
                   help="one channel of the vibration (ay) and of the process (pressure) null for 2-4 hours around a "
                        "fault on each pump's first scored day, rows kept: how a modality holds with a dead channel")
    p.add_argument("--stops", action="store_true",
                   help="each pump stops 2-4 times a day for 20-120 minutes, training days too (run down and up over 2 "
                        "minutes; still shaft, resting pressure, the controller's stop and start lines): normal, "
                        "unlabelled - how scores hold through a fleet's stops and start-ups")
    p.add_argument("--ac-vibration", action="store_true",
                   help="every vibration axis oscillates around zero (a real accelerometer): the load shows only in "
                        "how far the axes swing, not in their window means")
    p = verb("validate", cmd_validate, "check a spec: every problem at once", spec="?")
    p.add_argument("--check-data", action="store_true",
                   help="also list each modality path's partitions, dates, files and columns, and check them")
    p.add_argument("--schema", action="store_true", help="print the spec's JSON Schema (for editors) and exit")
    p = verb("train", cmd_train, "train a model version on the spec's training window")
    p.add_argument("--no-promote", action="store_true",
                   help="save it as a candidate: LATEST stays as it is until dmafn promote names it")
    p = verb("promote", cmd_promote, "point LATEST at a model version: a candidate, or an older one to roll back to")
    p.add_argument("model_version", help="the version's id (a folder under the spec's registry)")
    p = verb("enroll", cmd_enroll, "give machines new to a model version statistics of their own, without training")
    p.add_argument("--start", type=_date, required=True, help="first day of the machines' data to fit on")
    p.add_argument("--end", type=_date, required=True, help="last day (inclusive)")
    p.add_argument("--model", default=None, help="the model version to enrol them into (default: LATEST)")
    p.add_argument("--no-promote", action="store_true", help="save the new version as a candidate (see train)")
    p = verb("recalibrate", cmd_recalibrate, "fit a model version's threshold and smoothing again with the spec's "
             "score.threshold and score.smoothing, without training")
    p.add_argument("--start", type=_date, default=None, help="first day to calibrate on (default: the version's "
                   "validation days)")
    p.add_argument("--end", type=_date, default=None, help="last day (inclusive)")
    p.add_argument("--model", default=None, help="the model version to recalibrate (default: LATEST)")
    p.add_argument("--no-promote", action="store_true", help="save the new version as a candidate (see train)")
    p = verb("score", cmd_score, "score one date (default: yesterday in the spec's timezone) into the Delta table")
    p.add_argument("--date", type=_date, default=None)
    p.add_argument("--model", default=None, help="model version (default: LATEST)")
    p = verb("backfill", cmd_backfill, "score every date of a range, one commit per date")
    p.add_argument("--start", type=_date, required=True)
    p.add_argument("--end", type=_date, required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--force", action="store_true", help="rescore dates already scored by this model version")
    p.add_argument("--skip-changed", action="store_true",
                   help="leave dates already scored by this model version as they are even where their partitions "
                        "changed since (files added, removed or rewritten; by default those are rescored)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the dates it would score and why, those it would leave, and its input and shards; "
                        "score and write nothing (no Ray)")
    p.add_argument("--parallel", type=_positive(int), default=None,
                   help="shards scored at once, one CPU each (default: the cluster's CPUs)")
    p.add_argument("--days-per-shard", type=_positive(int), default=7,
                   help="consecutive dates a shard may hold, each still committed alone (default 7)")
    p.add_argument("--shard-mb", type=_positive(float), default=64,
                   help="Parquet input per shard, look-back days included: bigger dates are split into entity "
                        "buckets, smaller ones share a shard (default 64)")
    p = verb("evaluate", cmd_evaluate, "metrics of scored dates against the labels")
    p.add_argument("--start", type=_date, default=None)
    p.add_argument("--end", type=_date, default=None)
    p.add_argument("--report", default=None, help="folder for metrics.json, metrics.txt and scores.png")
    p.add_argument("--baselines", action="store_true", help="also train each modality alone for comparison")
    p.add_argument("--min-ticks", type=_tick_counts, default=(), metavar="N[,N...]",
                   help="also give the event-wise figures when only alarm events of N ticks or more count, for these N "
                        "(always for 1, 2, 3, 5, 10): what `dmafn alarms --min-ticks N` would page")
    p = verb("report", cmd_report, "one self-contained HTML page: metrics, curves, timelines, alarms, runs, quality")
    p.add_argument("--start", type=_date, default=None)
    p.add_argument("--end", type=_date, default=None)
    p.add_argument("--out", default="dmafn-report.html", help="the HTML file to write (default dmafn-report.html)")
    p.add_argument("--entities", default=None,
                   help="comma-separated entities to draw (default: the 4 with the most alarm ticks)")
    p.add_argument("--top", type=_positive(int), default=20, help="alarm events listed (default 20)")
    p.add_argument("--min-ticks", type=_tick_counts, default=(), metavar="N[,N...]",
                   help="more N for the event-wise table by alarm length, as `dmafn evaluate --min-ticks` takes them")
    p = verb("alarms", cmd_alarms, "the alarm events of scored dates (default: the newest): entity, start, end, "
             "peak, the modality that drove it - for a pager or ticket queue")
    p.add_argument("--date", type=_date, default=None, help="one scored date")
    p.add_argument("--start", type=_date, default=None)
    p.add_argument("--end", type=_date, default=None)
    p.add_argument("--json", action="store_true", help="one JSON object per event (times ISO 8601, UTC)")
    p.add_argument("--min-ticks", type=_positive(int), default=1,
                   help="only events of at least this many alarm ticks (default 1: every one)")
    p = verb("profile", cmd_profile, "per modality and day: rows, entities, period, gaps, nulls, duplicates")
    p.add_argument("--start", type=_date, required=True)
    p.add_argument("--end", type=_date, required=True)
    p.add_argument("--out", default=None, help="also write the table to this Parquet file")
    p = verb("status", cmd_status, "model versions, dates scored, failed or never scored, days unlike validation")
    p.add_argument("--days", type=_positive(int), default=7, help="the newest dates listed and checked (default 7)")
    p.add_argument("--max-age-days", type=_positive(int), default=None,
                   help="a newest scored date older than this many days before today (spec's timezone) is a problem")
    p.add_argument("--check", action="store_true", help="exit with code 1 when there is a problem (for monitoring)")
    p.add_argument("--json", action="store_true", help="print what was found as JSON instead of lines")
    p = verb("maintain", cmd_maintain, "compact and vacuum the output Delta tables")
    p.add_argument("--retention-hours", type=int, default=168)
    return parser


def main(argv: list[str] | None = None, verb: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if verb:
        argv = [verb, *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "start", None) and getattr(args, "end", None) and args.end < args.start:
        parser.error(f"--end {args.end} is before --start {args.start}")      # before any Ray starts
    if getattr(args, "date", None) and (getattr(args, "start", None) or getattr(args, "end", None)):
        parser.error("--date, or --start and --end, not both")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipelines").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        code = args.fn(args) or 0                # `status --check` returns 1 when it found a problem
    except (SpecError, DataError) as exc:
        if args.verbose:                  # the one line below says what; the traceback says where, on request
            traceback.print_exc(file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BackfillError as exc:          # the other dates are committed: re-running retries only these
        for day, cause in exc.failed:
            print(f"error: {day}: {cause}", file=sys.stderr)
        print(f"error: {len(exc.failed)} date(s) failed (recorded as failed in the runs table); the others are "
              "committed, and re-running the backfill scores only the dates still missing", file=sys.stderr)
        return 1
    except Interrupted as exc:            # a backfill stopped between commits: say how far it got
        print(f"interrupted: {exc.committed} of {exc.total} dates committed; run again to continue (committed "
              "dates are skipped)", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted: the dates already committed stay committed; run again to continue (a backfill "
              "skips them)", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - anything else: one line, the traceback with -v
        if args.verbose:
            traceback.print_exc(file=sys.stderr)
        print(f"error: unexpected {type(exc).__name__}: {exc} (run with -v for the traceback)", file=sys.stderr)
        return 3
    return code


def run(verb: str | None = None) -> NoReturn:
    """The process entry point (the `dmafn` script, `python -m jobs.VERB`): `main`, the exit handlers, then the
    exit code without the interpreter's teardown. By then every output is committed and closed and Ray is shut
    down; what is skipped is freeing torch's, Arrow's and Ray's modules object by object (~0.7 s of every
    command, measured after a backfill)."""
    code = main(verb=verb)
    logging.shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dmafn")
    except PackageNotFoundError:
        return "unknown (not installed)"


if __name__ == "__main__":
    run()
