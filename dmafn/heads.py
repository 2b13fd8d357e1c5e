"""Detector heads over a fused representation z (B, d).

Every head reconstructs each modality's target from z (except the classifier) and may add an auxiliary
loss and a latent anomaly term:
- AutoencoderHead: a bottleneck; score = reconstruction error.
- VAEHead: Gaussian latent; loss = reconstruction + beta * KL (the negative ELBO); latent term = KL.
- AdversarialHead: an adversarial autoencoder: a discriminator tells latent codes from N(0, I) samples,
  the encoder learns to fool it with the non-saturating generator loss (one optimiser); latent term =
  -log D(code), how unlike the prior a code is.
- SVDDHead: Deep SVDD, a bias-free projection pulled towards a fixed centre; latent term = squared
  distance to the centre. A reconstruction loss is kept as a regulariser against hypersphere collapse.
- ClassifierHead: supervised, a logit per tick; trained with class-weighted BCE when labels exist.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


@dataclass
class HeadOutput:
    recon: dict[str, torch.Tensor] = field(default_factory=dict)  # m -> (B, D_m)
    aux_loss: torch.Tensor | None = None                           # scalar
    latent_score: torch.Tensor | None = None                       # (B,)
    logit: torch.Tensor | None = None                              # (B,)


class Decoders(nn.Module):
    """One MLP per modality from a code (B, k) to that modality's target (B, D_m)."""

    def __init__(self, d_in: int, target_dims: dict[str, int], hidden: int):
        super().__init__()
        self.nets = nn.ModuleDict({m: nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, dim))
                                   for m, dim in target_dims.items()})

    def forward(self, code: torch.Tensor) -> dict[str, torch.Tensor]:
        return {m: net(code) for m, net in self.nets.items()}


def _encoder(d_model: int, out: int, bias: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_model, d_model, bias=bias), nn.GELU(), nn.Linear(d_model, out, bias=bias))


class AutoencoderHead(nn.Module):
    def __init__(self, d_model: int, latent: int, target_dims: dict[str, int]):
        super().__init__()
        self.encode = _encoder(d_model, latent)
        self.decoders = Decoders(latent, target_dims, 2 * d_model)

    def forward(self, z: torch.Tensor) -> HeadOutput:
        code = self.encode(z)                                             # (B, k)
        return HeadOutput(recon=self.decoders(code))


class VAEHead(nn.Module):
    def __init__(self, d_model: int, latent: int, target_dims: dict[str, int], beta: float = 0.1):
        super().__init__()
        self.encode = _encoder(d_model, 2 * latent)
        self.decoders = Decoders(latent, target_dims, 2 * d_model)
        self.beta = beta

    def forward(self, z: torch.Tensor) -> HeadOutput:
        mu, logvar = self.encode(z).chunk(2, dim=1)                       # (B, k) each
        logvar = logvar.clamp(-8, 8)
        code = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1)           # (B,)
        return HeadOutput(recon=self.decoders(code), aux_loss=self.beta * kl.mean(), latent_score=kl)


class AdversarialHead(nn.Module):
    """Adversarial autoencoder trained with one optimiser: the discriminator learns codes vs. prior
    samples on detached codes; the encoder gets the non-saturating generator loss -log D(code) through
    a frozen copy of the discriminator's weights. (Reversing the discriminator's gradient instead gives
    the saturating loss: once the discriminator rejects codes confidently the encoder gets no gradient,
    codes drift off and reconstructions collapse.)"""

    def __init__(self, d_model: int, latent: int, target_dims: dict[str, int], weight: float = 0.1):
        super().__init__()
        self.encode = _encoder(d_model, latent)
        self.decoders = Decoders(latent, target_dims, 2 * d_model)
        self.discriminator = nn.Sequential(nn.Linear(latent, d_model), nn.GELU(), nn.Linear(d_model, 1))
        self.weight = weight

    def forward(self, z: torch.Tensor) -> HeadOutput:
        code = self.encode(z)                                             # (B, k)
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        logit = functional_call(self.discriminator, frozen, (code,)).squeeze(1)   # (B,), grads to the encoder only
        unlike_prior = F.softplus(-logit)                                 # -log D(code), (B,)
        aux = None
        if self.training:
            fake = self.discriminator(code.detach()).squeeze(1)
            real = self.discriminator(torch.randn_like(code)).squeeze(1)
            critic = F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)) + \
                F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
            aux = self.weight * (critic + unlike_prior.mean())
        return HeadOutput(recon=self.decoders(code), aux_loss=aux, latent_score=unlike_prior.detach())


class SVDDHead(nn.Module):
    def __init__(self, d_model: int, latent: int, target_dims: dict[str, int], weight: float = 0.1):
        super().__init__()
        self.project = _encoder(d_model, latent, bias=False)
        self.decoders = Decoders(latent, target_dims, 2 * d_model)
        self.register_buffer("center", torch.zeros(latent))
        self.register_buffer("center_set", torch.zeros((), dtype=torch.bool))
        self.weight = weight

    def forward(self, z: torch.Tensor) -> HeadOutput:
        code = self.project(z)                                            # (B, k)
        if self.training and not bool(self.center_set):
            with torch.no_grad():                                         # Ruff et al.: c = mean of initial codes
                center = code.mean(0)
                center = torch.where(center.abs() < 0.01, torch.full_like(center, 0.01).copysign(center), center)
                self.center.copy_(center)
                self.center_set.fill_(True)
        dist = ((code - self.center) ** 2).sum(1)                        # (B,)
        return HeadOutput(recon=self.decoders(code), aux_loss=self.weight * dist.mean(), latent_score=dist)


class ClassifierHead(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, 1))

    def forward(self, z: torch.Tensor) -> HeadOutput:
        return HeadOutput(logit=self.net(z).squeeze(1))                   # (B,)


def build_head(kind: str, d_model: int, latent: int, target_dims: dict[str, int]) -> nn.Module:
    """A detector head by name: autoencoder | vae | adversarial | svdd | classifier."""
    if kind == "autoencoder":
        return AutoencoderHead(d_model, latent, target_dims)
    if kind == "vae":
        return VAEHead(d_model, latent, target_dims)
    if kind == "adversarial":
        return AdversarialHead(d_model, latent, target_dims)
    if kind == "svdd":
        return SVDDHead(d_model, latent, target_dims)
    if kind == "classifier":
        return ClassifierHead(d_model)
    raise ValueError(f"unknown detector {kind!r}")
