"""How unlike the training encodings a modality's encoding is: a Gaussian fitted to the encoder's output on
training ticks, and the squared Mahalanobis distance of an encoding from it.

An autoencoder's error misses what it reconstructs well: a camera fading to fog is a smooth frame, easy to
reconstruct, yet its encoding lies where no training frame's did. With `encoding_distance: w` on a modality
(spec), its error is multiplied by `distance ** w` - `distance` the squared Mahalanobis distance per dimension,
about 1 for a typical encoding - so the contribution is the log error plus `w` times the log distance.

    sums = EncodingSums.of(tokens)          # (n, d) -> count, mean, centred outer products (float64; mergeable)
    density.fit(sums_a + sums_b)            # mean and ridge-regularised precision, kept as buffers
    density.distance(tokens)                # (B, d) -> (B,) squared distance / d

Fitted in two passes over the training ticks: the second sums only the encodings the first fit calls typical
(`EncodingDensity.typical`: within the chi-square 99.9 % quantile for d dimensions), so unlabelled incidents in
the training history do not widen the Gaussian they are later measured against (one reweighting step, as in
robust covariance estimation). On clean training ticks it leaves out none or nearly none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dmafn.features import pairwise_merge

TYPICAL_Z = 3.090232     # the standard normal's 99.9 % quantile: the chi-square cut of `EncodingDensity.typical`
RIDGE = 1e-3        # added to the covariance's diagonal, as a share of its mean variance: a few near-constant
                    # dimensions (encodings are often low-rank) do not make every small move in them huge


@dataclass
class EncodingSums:
    """Count, mean and centred sum of outer products (scatter) of encodings (float64), added up over batches,
    files or workers pairwise (Chan et al.): never a difference of large sums, so a dimension whose encodings sit
    far from zero beside their spread keeps its variance."""

    count: int
    mean: np.ndarray         # (d,)
    scatter: np.ndarray      # (d, d): sum of (z - mean)(z - mean)^T

    @classmethod
    def zeros(cls, dim: int) -> "EncodingSums":
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def of(cls, tokens: np.ndarray | torch.Tensor) -> "EncodingSums":
        """The sums of encodings (n, d)."""
        z = tokens.detach().double().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens, float)
        if not len(z):
            return cls.zeros(z.shape[1])
        mean = z.mean(0)
        centred = z - mean
        return cls(len(z), mean, centred.T @ centred)

    def __add__(self, other: "EncodingSums") -> "EncodingSums":
        return EncodingSums(*pairwise_merge(self.count, self.mean, self.scatter, other.count, other.mean, other.scatter))


def add_sums(total: dict[str, EncodingSums], more: dict[str, EncodingSums]) -> dict[str, EncodingSums]:
    """`total` with each modality's sums in `more` added (in place; returned)."""
    for m, sums in more.items():
        total[m] = total[m] + sums if m in total else sums
    return total


class EncodingDensity(nn.Module):
    """A Gaussian over one modality's encodings (mean and precision as buffers, saved with the weights);
    `weight` is the spec's `encoding_distance`. Until fitted (`ticks` 0) its factor is 1."""

    def __init__(self, dim: int, weight: float):
        super().__init__()
        self.weight = float(weight)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("precision", torch.eye(dim))
        self.register_buffer("ticks", torch.zeros((), dtype=torch.long))

    @property
    def fitted(self) -> bool:
        return int(self.ticks) > 0

    def fit(self, sums: EncodingSums) -> None:
        """Mean and precision from the encodings' sums; a modality with fewer ticks than dimensions + 1 stays
        unfitted (its factor 1)."""
        dim = len(self.mean)
        if sums.count <= dim:
            self.ticks.fill_(0)
            return
        mean, cov = np.array(sums.mean, np.float64), sums.scatter / sums.count      # a copy: sums may be read-only
        cov = (cov + cov.T) / 2 + RIDGE * max(np.trace(cov) / dim, 1e-12) * np.eye(dim)
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype))
        self.precision.copy_(torch.as_tensor(np.linalg.inv(cov), dtype=self.precision.dtype))
        self.ticks.fill_(sums.count)

    @property
    def typical_limit(self) -> float:
        """The 99.9 % quantile of a chi-square with d degrees of freedom, per dimension (Wilson-Hilferty): what
        a Gaussian encoding's `distance` stays under 999 times in 1000 (1.96 for d = 32)."""
        k = 2.0 / (9.0 * len(self.mean))
        return (1.0 - k + TYPICAL_Z * math.sqrt(k)) ** 3

    def typical(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, d) -> (B,) bool: encodings within `typical_limit` of the fit (all of them while unfitted)."""
        if not self.fitted:
            return torch.ones(len(tokens), dtype=torch.bool, device=tokens.device)
        return self.distance(tokens) <= self.typical_limit

    def distance(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, d) encodings -> (B,) squared Mahalanobis distance per dimension (about 1 for a typical one)."""
        z = tokens.float() - self.mean                                                       # (B, d)
        return ((z @ self.precision) * z).sum(1) / len(self.mean)

    def factor(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, d) -> (B,): `distance ** weight` (floored at 1e-6), 1 while unfitted."""
        if not self.fitted:
            return torch.ones(len(tokens), device=tokens.device)
        return self.distance(tokens).clamp(min=1e-6) ** self.weight
