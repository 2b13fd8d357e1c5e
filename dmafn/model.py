"""The DMAFN network: per-modality encoders, a fusion layer and a detector head, composed (not inherited).

    inputs[m] --encoder_m--> token_m (B, d) --fusion(tokens, mask)--> z (B, d) --head--> recon_m, latent term
Late fusion has no fusion layer: each modality gets its own head and the scores are voted on afterwards.
Early fusion feeds the modalities' aligned inputs straight into one network.

Scores per modality come from reconstruction errors. With `cross_modal` scoring the model also predicts
each modality with that modality hidden (leave-one-out), so a modality that is normal on its own but no
longer agrees with the others still scores high; modality dropout in training teaches exactly that.
A modality with `encoding_distance` in the spec also has an `EncodingDensity` (`dmafn.density`), fitted after
training on the training ticks' encodings: its error is multiplied by how far its encoding lies from them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dmafn.density import EncodingDensity, EncodingSums
from dmafn.encoders import AudioEncoder, ImageEncoder, SeriesEncoder, TabularEncoder, TextEncoder
from dmafn.features import TEXT_TOKENS
from dmafn.fusion import AttentionFusion, EarlyFusion, GatedFusion
from dmafn.heads import HeadOutput, build_head
from dmafn.spec import ModalitySpec, ModelSpec


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network (saved with each model version)."""

    fusion: str = ModelSpec.fusion
    detector: str = ModelSpec.detector
    d_model: int = 32
    latent: int = 12
    series_encoder: str = ModelSpec.series_encoder
    text_encoder: str = ModelSpec.text_encoder
    modality_dropout: float = ModelSpec.modality_dropout
    channel_dropout: float = ModelSpec.channel_dropout
    cross_modal: bool = ModelSpec.cross_modal_scoring
    text_novelty: bool = False      # the text target counts lines and tokens unseen in training (versions since
                                    # the text vocabulary; older ones load without it)
    image_grid: bool = False        # image embeddings keep a 4x4 grid of places (versions since 2026-12-02; older
                                    # ones averaged the whole frame and load without it)
    hold_payloads: bool = False     # a tabular, image or audio modality's error is held from the tick its row arrived
                                    # at while that row stays the latest and the machine has moved since
                                    # (`dmafn.scoring.hold_payload_errors`; versions since 2026-12-06, older ones
                                    # score each tick afresh)


def small(**overrides) -> ModelConfig:
    """Preset: d_model 32, latent 12 - CPU friendly."""
    return ModelConfig(**{"d_model": 32, "latent": 12, **overrides})


def base(**overrides) -> ModelConfig:
    """Preset: d_model 64, latent 24 - for GPUs and larger fleets."""
    return ModelConfig(**{"d_model": 64, "latent": 24, **overrides})


PRESETS = {"small": small, "base": base}


def model_config(m: ModelSpec) -> ModelConfig:
    """The network config a spec's `model` section asks for: its named preset plus its options."""
    return PRESETS[m.preset](fusion=m.fusion, detector=m.detector, series_encoder=m.series_encoder,
                             text_encoder=m.text_encoder, modality_dropout=m.modality_dropout,
                             channel_dropout=m.channel_dropout,
                             cross_modal=m.cross_modal_scoring, text_novelty=True,
                             image_grid=True, hold_payloads=True)


def build_encoder(m: ModalitySpec, cfg: ModelConfig) -> nn.Module:
    if m.kind == "tabular":
        return TabularEncoder(len(m.columns), cfg.d_model)
    if m.kind == "timeseries":
        return SeriesEncoder(len(m.columns), m.steps, cfg.d_model, m.encoder or cfg.series_encoder)
    if m.kind == "image":
        return ImageEncoder(m.channels, cfg.d_model, grid=cfg.image_grid)
    if m.kind == "text":
        return TextEncoder(cfg.d_model, m.encoder or cfg.text_encoder, TEXT_TOKENS, novelty=cfg.text_novelty)
    if m.kind == "audio":
        return AudioEncoder(m.sample_rate, cfg.d_model)
    raise ValueError(f"no encoder for modality kind {m.kind!r}")


@dataclass
class ModelOutput:
    targets: dict[str, torch.Tensor]
    heads: dict[str, HeadOutput]   # "fused", or one per modality for late fusion
    tokens: torch.Tensor | None = None   # (B, M, d) modality tokens; None for early fusion

    def recon(self, m: str) -> torch.Tensor:
        head = self.heads.get(m) or self.heads["fused"]
        return head.recon[m]


class DMAFN(nn.Module):
    """Encoders, fusion and heads passed in; `fusion=None` means late fusion (`heads` keyed by modality);
    `densities`: an `EncodingDensity` for each modality whose error weighs its encoding's distance."""

    def __init__(self, encoders: nn.ModuleDict, fusion: nn.Module | None, heads: nn.ModuleDict, cfg: ModelConfig,
                 densities: nn.ModuleDict | None = None):
        super().__init__()
        self.encoders, self.fusion, self.heads, self.cfg = encoders, fusion, heads, cfg
        self.densities = densities if densities is not None else nn.ModuleDict()
        self.modalities = tuple(encoders.keys())
        self.channel_rates: dict[str, float] = {}    # a modality's own `channel_dropout`, where the spec gives one

    @property
    def late(self) -> bool:
        return self.fusion is None

    def forward(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> ModelOutput:
        targets = {m: enc.target(inputs[m]) for m, enc in self.encoders.items()}          # m -> (B, D_m)
        if isinstance(self.fusion, EarlyFusion):
            return ModelOutput(targets, {"fused": self.heads["fused"](self.fuse(None, targets, mask))})
        tokens = torch.stack([enc(inputs[m]) for m, enc in self.encoders.items()], 1)      # (B, M, d)
        if self.late:
            return ModelOutput(targets, {m: self.heads[m](tokens[:, i]) for i, m in enumerate(self.modalities)},
                               tokens)
        return ModelOutput(targets, {"fused": self.heads["fused"](self.fuse(tokens, targets, mask))}, tokens)

    def fuse(self, tokens: torch.Tensor | None, targets: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        if isinstance(self.fusion, EarlyFusion):
            return self.fusion([targets[m] for m in self.modalities], mask)
        return self.fusion(tokens, mask)                                                    # (B, d)

    def logit(self, out: ModelOutput, mask: torch.Tensor) -> torch.Tensor:
        """Classifier logit (B,); with late fusion the mean of the present modalities' logits."""
        if not self.late:
            return out.heads["fused"].logit
        logits = torch.stack([out.heads[m].logit for m in self.modalities], 1)            # (B, M)
        weights = mask.float()
        return (logits * weights).sum(1) / weights.sum(1).clamp(min=1)

    def errors(self, out: ModelOutput, channels: dict[str, torch.Tensor] | None = None,
               parts: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Per-modality mean squared reconstruction error (B, M); `channels`: m -> (B, C) the channels of a tabular
        or series modality that hold a value (`Features.channels`), a missing one left out of its mean; `parts`,
        when given, gets each channel's part of it (`channel_parts`: which channel drives the modality's error)."""
        cols = []
        for m in self.modalities:
            squared = F.mse_loss(out.recon(m), out.targets[m], reduction="none")                  # (B, D)
            cols.append(self.mean_error(m, squared, channels))
            if parts is not None and (split := self.channel_parts(m, squared, channels)) is not None:
                parts[m] = split
        return torch.stack(cols, 1)

    def mean_error(self, m: str, squared: torch.Tensor, channels: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """(B, D) squared errors of modality m's target -> (B,) their mean over the dimensions of the channels held
        (all of them where none is missing: the plain mean)."""
        held = None if channels is None else channels.get(m)
        if held is None or bool(held.all()):
            return squared.mean(1)
        weights = self.encoders[m].target_weights(held)                                       # (B, D)
        return (squared * weights).sum(1) / weights.sum(1).clamp(min=1)

    def channel_parts(self, m: str, squared: torch.Tensor,
                      channels: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
        """(B, D) squared errors of modality m's target -> (B, C) each channel's part of `mean_error` (they add up
        to it; a missing channel's 0) for a tabular or series modality of two channels or more, or each mel band's
        for an audio modality; else None."""
        encoder = self.encoders[m]
        if not hasattr(encoder, "channel_means"):
            return None
        per = encoder.channel_means(squared)                                                  # (B, C)
        if per.shape[1] < 2:
            return None
        held = None if channels is None else channels.get(m)
        if held is None:
            return per / per.shape[1]
        weights = held.float()
        return per * weights / weights.sum(1, keepdim=True).clamp(min=1)

    def encoding_factors(self, out: ModelOutput) -> torch.Tensor:
        """(B, M): each modality's `EncodingDensity.factor` of its encoding, 1 where it has none. A model with
        densities always has tokens (`build_model` refuses them with early fusion)."""
        ones = torch.ones(out.tokens.shape[0], device=out.tokens.device)
        return torch.stack([self.densities[m].factor(out.tokens[:, i]) if m in self.densities else ones
                            for i, m in enumerate(self.modalities)], 1)

    @torch.no_grad()
    def encoding_sums(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor,
                      typical_only: bool = False) -> dict[str, EncodingSums]:
        """The sums of one batch's encodings of each modality with a density, over the ticks it is present at
        (eval mode); `typical_only`: only the encodings its current fit calls typical (the second pass)."""
        self.eval()
        out = {}
        for i, m in enumerate(self.modalities):
            if m in self.densities:                 # only the weighed modalities' encoders run
                tokens = self.encoders[m](inputs[m])                                            # (B, d)
                rows = mask[:, i] & self.densities[m].typical(tokens) if typical_only else mask[:, i]
                out[m] = EncodingSums.of(tokens[rows])
        return out

    def fit_densities(self, sums: dict[str, EncodingSums]) -> dict[str, int]:
        """Fit each density on its modality's summed training encodings; returns the ticks each was fitted on
        (0: too few, left unfitted)."""
        for m, density in self.densities.items():
            density.fit(sums.get(m, EncodingSums.zeros(len(density.mean))))
        return {m: int(d.ticks) for m, d in self.densities.items()}

    def leave_one_out_errors(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor,
                             out: ModelOutput | None = None,
                             channels: dict[str, torch.Tensor] | None = None,
                             parts: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, M): error of predicting each modality with it hidden; NaN where nothing else is present;
        `channels` as in `errors`; `parts`, when given, gets each channel's part of it (`channel_parts`).

        `out`: this batch's forward output in eval mode, whose encodings are reused (the encoders are most
        of the cost); without it the encoders run again."""
        if out is not None:
            targets, tokens = out.targets, out.tokens
        else:
            targets = {m: enc.target(inputs[m]) for m, enc in self.encoders.items()}
            tokens = None if isinstance(self.fusion, EarlyFusion) else \
                torch.stack([enc(inputs[m]) for m, enc in self.encoders.items()], 1)            # (B, M, d)
        # all M "one modality hidden" variants in one pass: block i of the (M*B)-row batch hides modality i
        n, b = len(self.modalities), mask.shape[0]
        hidden = mask.repeat(n, 1)                                                          # (M*B, M)
        rows, hide = torch.arange(n * b, device=mask.device), torch.arange(n, device=mask.device).repeat_interleave(b)
        hidden[rows, hide] = False
        if isinstance(self.fusion, AttentionFusion) and n > 1:
            z = self.fusion.leave_one_out(tokens, mask)                                     # (M*B, d)
        else:
            z = self.fuse(None if tokens is None else tokens.repeat(n, 1, 1),
                          {m: t.repeat(n, 1) for m, t in targets.items()}, hidden)
        recon = self.heads["fused"](z).recon
        cols = []
        for i, m in enumerate(self.modalities):
            block = slice(i * b, (i + 1) * b)
            squared = F.mse_loss(recon[m][block], targets[m], reduction="none")                    # (B, D)
            err = self.mean_error(m, squared, channels)                                              # (B,)
            if parts is not None and (split := self.channel_parts(m, squared, channels)) is not None:
                parts[m] = split
            cols.append(torch.where(hidden[block].any(1), err, torch.full_like(err, float("nan"))))
        return torch.stack(cols, 1)


def build_model(modalities: dict[str, ModalitySpec], cfg: ModelConfig) -> DMAFN:
    """Build the network for these modalities from a config (see `small`, `base`); a modality's own
    `channel_dropout` (a training setting, not saved with the weights) where the spec gives one."""
    model = _network(modalities, cfg)
    model.channel_rates = {name: m.channel_dropout for name, m in modalities.items() if m.channel_dropout is not None}
    return model


def _network(modalities: dict[str, ModalitySpec], cfg: ModelConfig) -> DMAFN:
    encoders = nn.ModuleDict({name: build_encoder(m, cfg) for name, m in modalities.items()})
    dims = {name: enc.target_dim for name, enc in encoders.items()}
    weighed = {name: m.encoding_distance for name, m in modalities.items() if m.encoding_distance}
    if weighed and (cfg.fusion == "early" or cfg.detector == "classifier"):
        raise ValueError(f"encoding_distance on {sorted(weighed)} needs modality encodings and reconstruction "
                         f"errors: fusion attention, gated or late, not {cfg.fusion!r} with {cfg.detector!r}")
    densities = nn.ModuleDict({name: EncodingDensity(cfg.d_model, w) for name, w in weighed.items()})
    if cfg.fusion == "late":
        heads = nn.ModuleDict({m: build_head(cfg.detector, cfg.d_model, cfg.latent, {m: dims[m]}) for m in dims})
        return DMAFN(encoders, None, heads, cfg, densities)
    if cfg.fusion == "early":
        fusion: nn.Module = EarlyFusion(list(dims.values()), cfg.d_model)
    elif cfg.fusion == "attention":
        fusion = AttentionFusion(len(dims), cfg.d_model)
    elif cfg.fusion == "gated":
        fusion = GatedFusion(len(dims), cfg.d_model)
    else:
        raise ValueError(f"unknown fusion {cfg.fusion!r} (early, late, attention, gated)")
    return DMAFN(encoders, fusion, nn.ModuleDict({"fused": build_head(cfg.detector, cfg.d_model, cfg.latent, dims)}),
                 cfg, densities)


def modality_dropout(mask: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Hide each present modality with probability p, always keeping at least one present."""
    if p <= 0 or mask.shape[1] < 2:
        return mask
    keep = torch.rand(mask.shape, generator=generator, device=mask.device) >= p
    dropped = mask & keep
    none_left = ~dropped.any(1) & mask.any(1)
    first_present = torch.argmax(mask.int(), 1)
    restore = F.one_hot(first_present, mask.shape[1]).bool() & none_left.unsqueeze(1)
    return dropped | restore


def channel_dropout(channels: dict[str, torch.Tensor], p: float | dict[str, float],
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Hide each held channel of a modality of two channels or more (m -> (B, C)) with probability p (per modality
    where `p` maps modality -> rate; a modality it leaves out: none hidden), always keeping at least one of those a
    row holds."""
    rates = p if isinstance(p, dict) else dict.fromkeys(channels, p)
    if all(rates.get(m, 0.0) <= 0 for m in channels):
        return channels
    hidden = {}
    for m, held in channels.items():
        rate = rates.get(m, 0.0)
        if held.shape[1] < 2 or rate <= 0:
            hidden[m] = held
            continue
        kept = held & (torch.rand(held.shape, generator=generator, device=held.device) >= rate)
        none_left = ~kept.any(1) & held.any(1)
        first_held = F.one_hot(torch.argmax(held.int(), 1), held.shape[1]).bool()
        hidden[m] = kept | (first_held & none_left.unsqueeze(1))
    return hidden


def training_loss(model: DMAFN, inputs: dict[str, torch.Tensor], mask: torch.Tensor,
                  labels: torch.Tensor | None = None, pos_weight: float = 1.0,
                  channels: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The loss of one batch: masked reconstruction (+ head terms; `channels` as in `DMAFN.errors`), or weighted
    BCE for the classifier."""
    if model.cfg.detector == "classifier":
        if labels is None:
            raise ValueError("detector 'classifier' needs labels to train")
        logit = model.logit(model(inputs, mask), mask)
        return F.binary_cross_entropy_with_logits(logit, labels.float(),
                                                  pos_weight=torch.tensor(pos_weight, device=logit.device))
    input_mask = mask if model.late else modality_dropout(mask, model.cfg.modality_dropout)
    rates = {m: model.channel_rates.get(m, model.cfg.channel_dropout) for m in channels or {}}
    if channels and any(rate > 0 for rate in rates.values()):
        # a hidden channel reads as a missing one does at scoring time (0, its training mean) and leaves the loss
        channels = channel_dropout(channels, rates)
        inputs = {m: model.encoders[m].hide_channels(x, channels[m]) if m in channels else x
                  for m, x in inputs.items()}
    out = model(inputs, input_mask)
    err = model.errors(out, channels)                                                        # (B, M)
    weights = mask.float()
    loss = (err * weights).sum() / weights.sum().clamp(min=1)
    for head_out in out.heads.values():
        if head_out.aux_loss is not None:
            loss = loss + head_out.aux_loss
    return loss
