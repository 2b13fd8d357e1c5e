"""The demo: generate -> train on the first days -> backfill the later days -> evaluate -> the HTML report ->
where the scoring stands (`dmafn status`)."""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

from dmafn.spec import load_spec
from dmafn.synthetic import SyntheticConfig
from pipelines.alarms import alarm_events
from pipelines.evaluate import evaluate
from pipelines.generate import write_synthetic
from pipelines.report import build_report
from pipelines.score import backfill
from pipelines.status import scoring_status
from pipelines.storage import Storage
from pipelines.train import train

log = logging.getLogger(__name__)


def run_demo(workdir: str | Path, cfg: SyntheticConfig = SyntheticConfig(), *, epochs: int | None = None,
             baselines: bool = True) -> dict[str, Any]:
    """Everything local under `workdir`; returns the evaluation result."""
    workdir = Path(workdir).absolute()
    spec_path = write_synthetic(workdir, cfg)
    spec = load_spec(spec_path)
    if epochs is not None:
        from dataclasses import replace
        spec = replace(spec, train=replace(spec.train, epochs=epochs))
    print(f"[demo] data and spec written under {workdir} ({spec_path})")
    version = train(spec)
    print(f"[demo] trained model version {version} ({spec.registry})")
    first = spec.train.end + dt.timedelta(days=1)
    last = cfg.start + dt.timedelta(days=cfg.days - 1)
    results = backfill(spec, first, last, version=version)
    for r in results:
        print(f"[demo] scored {r.date}: {r.ticks_in} ticks = {r.rows_scored} scored + {r.rows_quarantined} "
              f"quarantined, {r.anomalies} alarms")
    print(f"[demo] scores: Delta table {spec.score.output}")
    result = evaluate(spec, start=first, end=last, report_dir=str(workdir / "report"), baselines=baselines)
    page = build_report(spec, workdir / "report" / "report.html", start=first, end=last)
    print(f"[demo] report page: {page} (open it in a browser)")
    print(f"[demo] where the scoring stands (dmafn status {spec_path}):")
    print("\n".join(f"  {line}".rstrip() for line in scoring_status(spec, Storage.from_spec(spec.storage),
                                                          spec_path=str(spec_path)).text().splitlines()))
    shown = alarm_events(spec).text().splitlines()              # the newest date's, as after a nightly
    print(f"[demo] the newest date's alarm events (dmafn alarms {spec_path}; --json for a pager):")
    print("\n".join(f"  {line}" for line in shown[:DEMO_EVENTS_SHOWN + 2])
          + (f"\n  ... {len(shown) - DEMO_EVENTS_SHOWN - 2} more" if len(shown) > DEMO_EVENTS_SHOWN + 2 else ""))
    result["report_page"] = str(page)
    return result


DEMO_EVENTS_SHOWN = 5       # alarm events the demo prints (`dmafn alarms` lists them all)
