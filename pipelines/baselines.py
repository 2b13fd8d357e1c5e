"""Each modality alone, for `evaluate --baselines`: what the modalities give without fusion.

The baseline is the spec's own model with `fusion: late`, `detector: autoencoder` and no cross-modal relations:
one detector per modality that never sees the others, its contribution per modality (`score_<m>`) being that
modality's score alone. It is
trained and scored by the same jobs as the model (Ray Train streaming shards, scoring tasks writing Delta), so
it keeps the scale rules whatever the window: its versions live under `<registry>/_alone`, its scores in the
Delta table `<output>_alone` (with its own runs and quarantine tables), and `evaluate` reads them a date at a
time beside the output table. A version trained from the same derived spec after the model's latest version is
reused, and dates it has scored already are skipped, so a second `evaluate --baselines` of the same window trains
and scores nothing; a model trained again (new data, say) gets its baseline trained again too.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import replace

from dmafn.spec import Spec
from pipelines.registry import Registry
from pipelines.score import backfill_dates
from pipelines.storage import DataError, Storage, join

log = logging.getLogger(__name__)

ALONE = "_alone"


def alone_spec(spec: Spec) -> Spec:
    """`spec` with one detector per modality (late fusion, autoencoder, a context's relations within its own
    modality only, each error scaled without the others' operating state): the same data, windows, training
    and calibration; model versions under `<registry>/_alone`, scores in `<output>_alone`."""
    output = spec.score.output.rstrip("/") + ALONE
    return replace(spec, model=replace(spec.model, fusion="late", detector="autoencoder", cross_modal_relations=False,
                                       state_baseline=False),
                   registry=join(spec.registry, ALONE),
                   score=replace(spec.score, output=output, quarantine=None, runs=None))


def latest_manifest(registry: Registry) -> dict | None:
    """The manifest of the registry's latest version; None when it has none."""
    try:
        latest = registry.latest()
    except DataError:                                  # no LATEST: nothing trained there yet
        return None
    return registry.manifest(latest)


def alone_version(spec: Spec, alone: Spec, storage: Storage) -> str:
    """The latest baseline version if it was trained from this very spec (training window included) after the
    model's latest version (the data the model learnt from, not older), else a version trained now."""
    baseline = latest_manifest(Registry(alone.registry, storage))
    model = latest_manifest(Registry(spec.registry, storage))
    wanted = json.loads(json.dumps(alone.to_dict(), default=str))
    if baseline and baseline.get("spec") == wanted and \
            (model is None or str(baseline.get("created_at")) > str(model.get("created_at"))):
        log.info("baselines: each modality alone, model version %s (trained from this spec after the model)",
                 baseline["version"])
        return baseline["version"]
    from pipelines.train import train              # torch: only where a baseline is trained

    log.info("baselines: training each modality alone (late fusion, autoencoder) into %s", alone.registry)
    return train(alone)


def score_alone(spec: Spec, dates: list[str]) -> Spec:
    """Train (or reuse) the baseline of `spec` and score `dates` (ISO strings) into its table; returns its spec,
    whose `score.output` holds the rows. Dates that version scored already are not scored again."""
    alone = alone_spec(spec)
    version = alone_version(spec, alone, Storage.from_spec(spec.storage))
    log.info("baselines: scoring %d date(s) into %s", len(dates), alone.score.output)
    backfill_dates(alone, [dt.date.fromisoformat(d) for d in dates], version=version)
    return alone
