"""Tiny in-memory multi-modal data for model tests: four modalities tied by a hidden load u."""
from __future__ import annotations

import numpy as np

from dmafn.features import Features
from dmafn.spec import ModalitySpec

MODALITIES = {
    "proc": ModalitySpec("proc", "tabular", "-", columns=("t", "p"), tolerance_us=1),
    "vib": ModalitySpec("vib", "timeseries", "-", columns=("x", "y"), period_us=1, window_us=8),
    "cam": ModalitySpec("cam", "image", "-", column="f", size=(16, 16), tolerance_us=1),
    "logs": ModalitySpec("logs", "text", "-", column="m", window_us=1),
    "mic": ModalitySpec("mic", "audio", "-", column="w", sample_rate=800, tolerance_us=1, clip_us=250_000),
}


def make(n: int, seed: int = 0, anomalies: int = 0, kind: str = "cross", modalities=("proc", "vib", "cam", "logs")):
    """Features (n rows) and labels; the last `anomalies` rows are anomalous of `kind` (cross | proc)."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(0, 1, n)
    bad = np.zeros(n, bool)
    bad[n - anomalies:] = anomalies > 0
    u_proc = np.where(bad & (kind == "cross"), (u + 0.5) % 1.0, u)
    x = {}
    x["proc"] = np.stack([u_proc * 2 - 1, u_proc * 2 - 1], 1) + rng.normal(0, 0.05, (n, 2))
    if kind == "proc":
        x["proc"][bad] += 4.0
    t = np.arange(8)
    x["vib"] = np.stack([u[:, None] * np.sin(t), u[:, None] * np.cos(t)], 2) + rng.normal(0, 0.05, (n, 8, 2))
    yy, xx = np.mgrid[0:16, 0:16] / 15
    x["cam"] = (0.2 + 0.6 * np.exp(-((xx[None] - u[:, None, None]) ** 2) / 0.02))[:, None] \
        + rng.normal(0, 0.02, (n, 1, 16, 16))
    tokens = np.zeros((n, 8), np.int64)
    tokens[:, -4:] = (2 + np.floor(u * 5)).astype(int)[:, None] + np.arange(4) * 10
    x["logs"] = tokens
    tt = np.arange(200) / 800
    x["mic"] = (0.3 + 0.5 * u[:, None]) * np.sin(2 * np.pi * (60 + 200 * u[:, None]) * tt) \
        + rng.normal(0, 0.02, (n, 200))
    inputs = {m: (x[m].astype(np.float32) if m != "logs" else x[m]) for m in modalities}
    mask = np.ones((n, len(modalities)), bool)
    return Features(inputs, mask, tuple(modalities)), bad.astype(int)


def specs(modalities=("proc", "vib", "cam", "logs")):
    return {m: MODALITIES[m] for m in modalities}
