"""Training steps shared by the in-memory Detector and the Ray Train worker loop."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from dmafn.density import EncodingSums, add_sums
from dmafn.features import Features
from dmafn.model import DMAFN, training_loss


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def batches(features: Features, batch_size: int, labels: np.ndarray | None = None, shuffle: bool = True,
            seed: int = 0) -> Iterator[tuple[Features, np.ndarray | None]]:
    """Mini-batches of in-memory features (rows with no modality present are skipped)."""
    rows = np.flatnonzero(features.mask.any(1))
    if shuffle:
        rows = np.random.default_rng(seed).permutation(rows)
    for start in range(0, len(rows), batch_size):
        idx = rows[start:start + batch_size]
        yield (Features({m: features.inputs[m][idx] for m in features.modalities}, features.mask[idx],
                        features.modalities, channels={m: c[idx] for m, c in features.channels.items()}),
               None if labels is None else labels[idx])


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked; a no-op elsewhere."""
    if bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: DMAFN, optimizer: torch.optim.Optimizer, features: Features, labels: np.ndarray | None,
               device: torch.device, pos_weight: float = 1.0, bf16: bool = False,
               loss_model: torch.nn.Module | None = None) -> float:
    """One optimiser step on one batch; returns the loss. `loss_model` is the (possibly DDP-wrapped) module."""
    model.train()
    inputs = {m: torch.from_numpy(np.ascontiguousarray(features.inputs[m])).to(device) for m in features.modalities}
    mask = torch.from_numpy(features.mask).to(device)
    channels = {m: torch.from_numpy(held).to(device) for m, held in features.channels.items()}
    y = None if labels is None else torch.from_numpy(np.asarray(labels, np.float32)).to(device)
    forward = model if loss_model is None else _Forwarder(loss_model, model)
    with autocast(device, bf16):
        loss = training_loss(forward, inputs, mask, y, pos_weight, channels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    optimizer.step()
    return float(loss.detach())


class _Forwarder:
    """Looks like the plain model to `training_loss`, but forwards through the wrapper."""

    def __init__(self, wrapped: torch.nn.Module, model: DMAFN):
        self._wrapped, self._model = wrapped, model

    def __call__(self, inputs, mask):
        return self._wrapped(inputs, mask)

    def __getattr__(self, name):
        return getattr(self._model, name)


def fit_model(model: DMAFN, features: Features, *, epochs: int, batch_size: int = 256, lr: float = 1e-3,
              labels: np.ndarray | None = None, seed: int = 0, device: str = "cpu") -> list[float]:
    """Train in memory; returns the mean loss of each epoch."""
    seed_everything(seed)
    dev = torch.device(device)
    model.to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-5)
    pos_weight = positive_weight(labels)
    history = []
    for epoch in range(epochs):
        losses = [train_step(model, optimizer, batch, y, dev, pos_weight)
                  for batch, y in batches(features, batch_size, labels, seed=seed + epoch)]
        history.append(float(np.mean(losses)) if losses else float("nan"))
    return history


def encoding_sums(model: DMAFN, features: Features, batch_size: int = 1024, device: str | torch.device = "cpu",
                  typical_only: bool = False) -> dict[str, EncodingSums]:
    """The sums of the encodings of each modality with a density (`DMAFN.encoding_sums`) over these ticks
    (`typical_only`: those its current fit calls typical); {} when the model has none."""
    if not len(model.densities):
        return {}
    dev = torch.device(device)
    model.to(dev)
    total: dict[str, EncodingSums] = {}
    for batch, _ in batches(features, batch_size, shuffle=False):
        inputs = {m: torch.from_numpy(np.ascontiguousarray(batch.inputs[m])).to(dev) for m in batch.modalities}
        add_sums(total, model.encoding_sums(inputs, torch.from_numpy(batch.mask).to(dev), typical_only))
    return total


def fit_densities_in_two_passes(model: DMAFN, pass_sums: Callable[[bool], dict[str, EncodingSums]]
                                ) -> tuple[dict[str, int], dict[str, int]]:
    """Fit the model's encoding densities in two passes over the training ticks, wherever they are held:
    `pass_sums(typical_only)` sums their encodings (`encoding_sums`) under the model's current fit; the second
    pass sums only those the first fit calls typical (`dmafn.density`). Returns the ticks each density was
    fitted on and those the second pass left out."""
    first = model.fit_densities(pass_sums(False))
    fitted = model.fit_densities(pass_sums(True))
    return fitted, {m: first[m] - n for m, n in fitted.items()}


def fit_densities(model: DMAFN, features: Features, batch_size: int = 1024,
                  device: str | torch.device = "cpu") -> dict[str, int]:
    """Fit the model's encoding densities on (training) ticks in memory (`fit_densities_in_two_passes`); returns
    the ticks each was fitted on."""
    return fit_densities_in_two_passes(
        model, lambda typical_only: encoding_sums(model, features, batch_size, device, typical_only))[0]


def positive_weight(labels: Iterable | None) -> float:
    """n_negative / n_positive for class-imbalance-aware BCE (1 without labels)."""
    if labels is None:
        return 1.0
    y = np.asarray(list(labels) if not isinstance(labels, np.ndarray) else labels).astype(bool)
    return float((~y).sum() / max(y.sum(), 1))
