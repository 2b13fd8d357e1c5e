"""The demo: generate -> train on the first days -> backfill the later days -> evaluate -> the HTML report ->
where the scoring stands (`dmafn status`)."""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

from dmafn.spec import load_spec
from dmafn.synthetic import SyntheticConfig
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
    result["report_page"] = str(page)
    return result
