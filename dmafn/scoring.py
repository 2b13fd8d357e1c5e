"""The one scoring path: features -> raw per-modality errors -> calibrated contributions -> fused score.

Used by the in-memory `Detector`, the scoring tasks and model validation alike.

Contribution of modality m (`score_<m>`): log of its reconstruction error (plus, with cross-modal
scoring, the error of predicting it from the other modalities), robustly standardised with the median
and interquartile range seen on validation ticks. A latent term of the head (KL, distance to centre,
discriminator) is standardised the same way and only adds evidence (clipped at 0, so a code that looks
more typical than usual never lowers a score); a fused head's term is shared equally among the present
modalities, a late-fusion head's term stays with its own modality.
The fused score is a vote over the present modalities' contributions (mean, max, weighted, attention),
so it stays comparable when a modality is absent. Modalities outside `voting` (a slow `context` view)
inform the others' reconstructions and keep their own contribution column, but do not vote: an hour of
look-back would otherwise hold an event's score up for an hour after it ends. The classifier head scores with its logit and
attributes by occlusion: the drop of the logit when a modality is hidden.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch

from dmafn.encoders import mel_band_names
from dmafn.features import Features, is_speed, state_owner
from dmafn.model import DMAFN
from dmafn.spec import CONTRIBUTION_SCALES, VOTES, ModalitySpec, ModelSpec, voting_modalities
from dmafn.validation import ArrayValues, Values, as_values


@dataclass
class RawScores:
    errors: np.ndarray                # (N, M) raw per-modality error, NaN where absent
    latent: np.ndarray | None         # (N,) fused head latent term, or (N, M) one per late-fusion head
    mask: np.ndarray                  # (N, M)
    state: np.ndarray | None = None   # (N, S) the ticks' operating state (`dmafn.features.operating_state`)
    state_owners: tuple[str, ...] = ()
    channel_errors: dict[str, np.ndarray] = field(default_factory=dict)   # m -> (N, C) each channel's part of
                                      # m's raw error (model and relations; `DMAFN.errors`' parts), NaN where absent
    held_state: dict[str, np.ndarray] = field(default_factory=dict)   # m -> (N, S) the operating state at the tick
                                      # m's held error was read at (`hold_payload_errors`); `state` for the others
    fresh_errors: dict[str, np.ndarray] = field(default_factory=dict)  # m -> (N,) a held modality's error as read
                                      # at the tick itself (its own value where not held; `settle_held`)
    fresh_channel_errors: dict[str, np.ndarray] = field(default_factory=dict)  # m -> (N, C) its parts, likewise
    prior_state: dict[str, np.ndarray] = field(default_factory=dict)  # m -> (N, S) a frame's or clip's operating
                                      # state at the tick before its row came, where it came while the machine moved
                                      # (`hold_payload_errors`); its held state elsewhere

    def rows(self, idx: np.ndarray) -> "RawScores":
        """The same raw scores for a subset of the ticks (`idx`: positions or a boolean mask)."""
        return RawScores(errors=self.errors[idx], latent=None if self.latent is None else self.latent[idx],
                         mask=self.mask[idx], state=None if self.state is None else self.state[idx],
                         state_owners=self.state_owners,
                         channel_errors={m: e[idx] for m, e in self.channel_errors.items()},
                         held_state={m: s[idx] for m, s in self.held_state.items()},
                         fresh_errors={m: e[idx] for m, e in self.fresh_errors.items()},
                         fresh_channel_errors={m: e[idx] for m, e in self.fresh_channel_errors.items()},
                         prior_state={m: s[idx] for m, s in self.prior_state.items()})

    def state_of(self, m: str) -> np.ndarray | None:
        """(N, S) the operating state modality m's error is read against: its held one, else the tick's."""
        return self.held_state.get(m, self.state)

    @staticmethod
    def concatenate(parts: list["RawScores"], order: np.ndarray | None = None) -> "RawScores":
        """Raw scores of consecutive batches as one, their rows taken in `order` when given (channel parts and
        held states kept where every batch has them)."""
        def joined(arrays: list[np.ndarray]) -> np.ndarray:
            whole = np.concatenate(arrays)
            return whole if order is None else whole[order]

        first = parts[0]

        def each(field_name: str) -> dict[str, np.ndarray]:
            own = [getattr(r, field_name) for r in parts]
            return {m: joined([o[m] for o in own]) for m in own[0] if all(m in o for o in own)}

        return RawScores(errors=joined([r.errors for r in parts]), mask=joined([r.mask for r in parts]),
                         latent=None if first.latent is None else joined([r.latent for r in parts]),
                         state=None if first.state is None else joined([r.state for r in parts]),
                         state_owners=first.state_owners,
                         channel_errors=each("channel_errors"), held_state=each("held_state"),
                         fresh_errors=each("fresh_errors"), fresh_channel_errors=each("fresh_channel_errors"),
                         prior_state=each("prior_state"))


@dataclass
class ScoreRecord:
    """Scores of N ticks: the fused `score` (N,) and `contributions` (N, M), NaN where absent."""

    score: np.ndarray
    contributions: np.ndarray
    mask: np.ndarray
    modalities: tuple[str, ...]


def _to_tensors(features: Features, rows: slice, device: torch.device) -> tuple[dict, torch.Tensor, dict]:
    inputs = {m: torch.from_numpy(np.ascontiguousarray(features.inputs[m][rows])).to(device)
              for m in features.modalities}
    channels = {m: torch.from_numpy(np.ascontiguousarray(held[rows])).to(device)
                for m, held in features.channels.items()}
    return inputs, torch.from_numpy(features.mask[rows]).to(device), channels


@torch.no_grad()
def raw_scores(model: DMAFN, features: Features, batch_size: int = 1024, device: str = "cpu",
               hold: dict[str, dict[str, tuple]] | None = None) -> RawScores:
    """Run the model over all ticks in eval mode. A version with `hold_payloads` holds a tabular, image or audio
    modality's error from the tick its row arrived at (`hold_payload_errors`); `hold`: that state per modality and
    group, read and updated - given the same dict for the consecutive batches of one shard (rows sorted by entity
    and time), its ticks hold as if scored at once; without it each call starts afresh."""
    model.eval()
    dev = torch.device(device)
    model.to(dev)
    errors, latents, parts = [], [], {}
    n = len(features.mask)
    for start in range(0, n, batch_size):
        inputs, mask, channels = _to_tensors(features, slice(start, start + batch_size), dev)
        if model.cfg.detector == "classifier":
            errors.append(_occlusion(model, inputs, mask))
            continue
        out = model(inputs, mask)
        own: dict[str, torch.Tensor] = {}                   # m -> (B, C), adding up to err[:, m]
        err = model.errors(out, channels, own)
        if model.cfg.cross_modal and not model.late and mask.shape[1] > 1:
            hidden: dict[str, torch.Tensor] = {}
            loo = model.leave_one_out_errors(inputs, mask, out, channels, hidden)  # reuses out's encodings
            err = err + torch.where(loo.isnan(), err, loo)    # nothing else present: own error twice
            for m, split in hidden.items():
                alone = loo[:, features.modalities.index(m)].isnan().unsqueeze(1)
                own[m] = own[m] + torch.where(alone, own[m], split)
        for m, split in own.items():
            parts.setdefault(m, []).append(split.cpu().numpy())
        if len(model.densities):   # an encoding unlike the training ones raises its modality's error
            err = err * model.encoding_factors(out)
        errors.append(err.cpu().numpy())
        if model.late:      # each modality's own head: its latent term belongs to that modality only
            terms = [out.heads[m].latent_score for m in features.modalities
                     if m in out.heads and out.heads[m].latent_score is not None]
            if len(terms) == len(features.modalities):
                latents.append(torch.stack(terms, 1).cpu().numpy())          # (B, M)
        elif out.heads["fused"].latent_score is not None:
            latents.append(out.heads["fused"].latent_score.cpu().numpy())   # (B,)
    m = len(features.modalities)
    err = np.concatenate(errors) if errors else np.zeros((0, m + (model.cfg.detector == "classifier")))
    latent = np.concatenate(latents) if latents else None
    mask = features.mask
    split_by = {m: np.concatenate(split).astype(np.float64) for m, split in parts.items()}
    held_state, prior_state, fresh, fresh_split = {}, {}, err, split_by      # fresh: each tick's own reading
    holding = model.cfg.detector != "classifier" and model.cfg.hold_payloads
    if holding:
        err, split_by, held_state, prior_state = hold_payload_errors(err, split_by, features, hold)
    if model.cfg.detector == "classifier":
        latent, err = err[:, 0], err[:, 1:]       # column 0: the full logit
    elif features.relation_errors is not None:    # a channel no longer where its relation with the others puts it
        err, fresh = err + features.relation_errors, fresh + features.relation_errors

    def with_relations(parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for m, split in parts.items():
            if m in features.relation_channels:
                split = split + features.relation_channels[m]
            out[m] = np.where(mask[:, features.modalities.index(m), None], split, np.nan)
        return out

    held = [m for m in features.taken if m in features.modalities] if holding and len(err) else []
    fresh = np.where(mask, fresh, np.nan) if held else None
    fresh_parts = with_relations({m: fresh_split[m] for m in held if m in fresh_split})
    return RawScores(errors=np.where(mask, err, np.nan), latent=latent, mask=mask, state=features.state,
                     state_owners=features.state_owners, channel_errors=with_relations(split_by),
                     held_state=held_state, fresh_errors={m: fresh[:, features.modalities.index(m)] for m in held},
                     fresh_channel_errors=fresh_parts, prior_state=prior_state)


HOLD_STATE_MOVE = 0.5     # `hold_payload_errors`: a payload is read against the machine as it was when its row came
                          # once the operating state has moved this far since (RMS, in training standard deviations;
                          # chosen 2026-12-06 on `--gradual --stops`, `--gradual` and the demo - see docs/fleets.md,
                          # "Stops and start-ups"; there a normal tick moves 0.33 from its camera frame's first
                          # tick, median)


def hold_payload_errors(errors: np.ndarray, parts: dict[str, np.ndarray], features: Features,
                        carry: dict[str, dict[str, tuple]] | None = None
                        ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each tabular, image or audio modality's error (N, M), channel parts (m -> (N, C)) and the operating state its
    error is expected at (`Features.state`, (N, S); returned per modality as `RawScores.held_state`), held from the
    tick its row arrived at while that row stays the latest (same entity and date, same `Features.taken`) and the
    machine has moved since: its operating state - the columns the modality's state baseline reads, the other
    modalities' levels - more than `HOLD_STATE_MOVE` standard deviations (RMS) from where it was at that tick (a
    tick whose distance cannot be read holds; without an operating state every later tick of the run holds).
    A camera frame taken every 5 minutes is the latest for 5 ticks; read afresh at each, it is compared with the
    others as they are now, not as they were when it was taken - after a pump stops, the frame still shows it
    running while the process says stopped, and its cross-modal error (and its error's expected level at a stopped
    pump) would call the frame anomalous. Held, it is judged against the state it was taken in, and what changed
    since shows in the other modalities' own errors; while the machine stays where it was, each tick reads it
    afresh, as before. For a modality with no level of its own (a frame, a clip) also its prior state (returned per
    such modality, `RawScores.prior_state`): where the machine moved more than `HOLD_STATE_MOVE` between the tick
    before its row came and the tick it came at, the state at the tick before - a frame is taken between two ticks,
    and one taken while a pump runs down is first read at a tick where the pump is already still, so both its
    readings judge a running pump's picture against rest; elsewhere (and where its group has no tick before) its
    held state. `settle_held` reads it against all three. Rows sorted by group, in time order within it. `carry`:
    group -> (taken, error, parts, state, prior state, the last tick's state) of each modality's run at the group's
    last tick, read and updated (see `raw_scores`)."""
    state = features.state
    if not features.taken or features.groups is None or not len(errors):
        return errors, parts, {}, {}
    errors, parts = errors.copy(), {m: p.copy() for m, p in parts.items()}
    held_state, prior_state = {}, {}
    levelled = {state_owner(o) for o in features.state_owners}
    groups, n = np.asarray(features.groups), len(errors)
    index = np.arange(n)
    group_start = np.r_[True, groups[1:] != groups[:-1]]
    group_end = np.r_[group_start[1:], True]
    for m, taken in features.taken.items():
        j = features.modalities.index(m)
        kept = {} if carry is None else carry.setdefault(m, {})
        part = parts.get(m)
        run_start = group_start | np.r_[True, taken[1:] != taken[:-1]] | (taken < 0)
        first = np.maximum.accumulate(np.where(run_start, index, 0))        # each tick's run's first tick
        run_error = errors[first, j]
        run_part = None if part is None else part[first]
        run_state = None if state is None else state[first]
        framed = state is not None and m not in levelled          # a frame or a clip: the tick before it came
        if framed:
            before = np.maximum(first - 1, 0)
            run_prior = np.where(((first > 0) & ~group_start[first])[:, None], state[before], run_state)
        starts = np.flatnonzero(run_start)
        ends = np.r_[starts[1:], n]
        for i in np.flatnonzero(group_start):         # a group's first run may go on from the batch before
            held = kept.get(groups[i])
            if held is not None and taken[i] >= 0 and held[0] == taken[i]:
                run = slice(i, ends[np.searchsorted(starts, i)])
                run_error[run] = held[1]
                if run_part is not None and held[2] is not None:
                    run_part[run] = held[2]
                if run_state is not None and held[3] is not None:
                    run_state[run] = held[3]
                if framed:
                    run_prior[run] = held[4]
            elif framed and held is not None and taken[i] >= 0:     # a run that starts here: the batch before's
                run_prior[slice(i, ends[np.searchsorted(starts, i)])] = held[5]      # last tick is the one before
        for i in np.flatnonzero(group_end):
            kept[groups[i]] = (int(taken[i]), float(run_error[i]), None if run_part is None else run_part[i].copy(),
                               None if run_state is None else run_state[i].copy(),
                               run_prior[i].copy() if framed else None, None if state is None else state[i].copy())
        hold = taken >= 0
        columns = [j for j in baseline_columns(list(features.state_owners), m)     # where, not how fast
                   if not is_speed(features.state_owners[j])]
        if run_state is not None:
            moved = state_move(state[:, columns], run_state[:, columns])
            hold &= ~(moved <= HOLD_STATE_MOVE)                       # NaN: cannot tell, held
        errors[hold, j] = run_error[hold]
        if part is not None:
            part[hold] = run_part[hold]
        if run_state is not None:
            held_state[m] = np.where(hold[:, None], run_state, state)
        if framed:                   # came while the machine moved (NaN: cannot tell, as held)
            came_moving = (taken >= 0) & (state_move(run_prior[:, columns], run_state[:, columns]) > HOLD_STATE_MOVE)
            prior_state[m] = np.where(came_moving[:, None], run_prior, held_state[m])
    return errors, parts, held_state, prior_state


def state_move(now: np.ndarray, then: np.ndarray) -> np.ndarray:
    """(N,) how far the operating state moved between two readings (N, k): the root mean square of the columns both
    hold; NaN where none (or k = 0)."""
    both = np.isfinite(now) & np.isfinite(then)
    count = both.sum(1)
    squares = np.where(both, now - then, 0.0) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.sqrt(squares.sum(1) / np.maximum(count, 1)), np.nan)


def channel_names(raw: RawScores, modalities: dict[str, ModalitySpec],
                  smooth: Callable[[str, np.ndarray], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per voting modality with channel parts (`RawScores.channel_errors`), the name (`part_names`) of the channel that
    drives its error at each tick (`top_channels`): the output's `channel_<m>`. `smooth(m, parts)`: each channel's
    part smoothed as the scores are (per entity and date, in time order; `Calibration.parts_smoothing`) before the
    largest is named - so the channel named is the one behind the smoothed contribution `score_<m>`, also on the
    ticks after a spike, where the tick's own largest part is the noise of whichever channel."""
    voting = voting_modalities(modalities)
    return {m: top_channels(parts if smooth is None else smooth(m, parts), part_names(modalities[m]))
            for m, parts in raw.channel_errors.items() if m in voting}


def line_names(features: Features, modalities: dict[str, ModalitySpec]) -> dict[str, np.ndarray]:
    """Per voting text modality fitted with a vocabulary, the template of each tick's window's latest line that the
    training days never held (`Features.novel_lines`; None where none, or the modality absent): its `channel_<m>`,
    the line to read where the logs drive an alarm."""
    voting = voting_modalities(modalities)
    return {m: lines for m, lines in features.novel_lines.items() if m in voting}


def part_names(m: ModalitySpec) -> tuple[str, ...]:
    """The names of a modality's error parts (`RawScores.channel_errors`): a sensor table's or series' columns, an
    audio clip's mel bands by their centre frequencies (`mel_band_names`)."""
    return mel_band_names(m.sample_rate) if m.kind == "audio" else tuple(m.columns)


def top_channels(parts: np.ndarray, names: tuple[str, ...] | list[str]) -> np.ndarray:
    """(N, C) channel parts of a modality's error (`RawScores.channel_errors`) -> (N,) the name of the channel with
    the largest part at each tick (object array; None where the modality is absent)."""
    out = np.full(len(parts), None, object)
    finite = np.isfinite(parts).all(1) if parts.size else np.zeros(len(parts), bool)
    if finite.any():
        out[finite] = np.asarray(names, object)[np.argmax(parts[finite], 1)]
    return out


def occlusion_groups(modalities: dict[str, ModalitySpec]) -> dict[str, tuple[str, ...]]:
    """Per voting modality, what `cause_names` hides to take it out: itself and its slow `context` view(s)."""
    return {m: (m, *(v for v, spec in modalities.items() if spec.context_of == m))
            for m in voting_modalities(modalities)}


def occlusion_contributions(model: DMAFN, features: Features, record: Callable[[RawScores], ScoreRecord],
                            groups: dict[str, tuple[str, ...]], batch_size: int = 1024,
                            device: str = "cpu", views: dict[str, Features] | None = None) -> np.ndarray:
    """(N, M, M) each tick's contributions (unsmoothed, as `record` makes them from raw scores) with one voting
    modality hidden from the model - with its context views, `groups` (`occlusion_groups`): [:, k, j] is modality
    j's with modality k hidden; NaN where k is absent, where j is hidden or absent, and for a k that is not a
    voting modality. Every payload is read at the tick itself here (nothing held).

    `views[m]`: the same ticks featurized with m's group absent (`featurize(..., absent=groups[m])`, of the whole spec
    or only its tabular and series modalities, `dmafn.features.level_spec`), for a modality that others' cross-modal
    relations read (`dmafn.features.relation_peers_read`): hidden, it is hidden from those relations too - the view's
    relation errors, by modality, where they fall back to their within-modality fits -, so an echo through a relation
    (a rough vibration breaking the process's relation with it) falls back as one through the fused code does. Nothing
    else is read from a view: the operating state stays the tick's own (without a modality's columns the others'
    baselines read on their wider fallbacks, which lowers their contributions for want of evidence, not because the
    hidden modality explained them)."""
    features = replace(features, taken={})
    names = list(features.modalities)
    n, m_count = features.mask.shape
    out = np.full((n, m_count, m_count), np.nan)
    for m, hide in groups.items():
        k = names.index(m)
        mask = features.mask.copy()
        mask[:, [names.index(h) for h in hide if h in names]] = False
        rows = np.flatnonzero(features.mask[:, k] & mask.any(1))
        if not len(rows):
            continue
        seen = features if not views or m not in views else with_relations_of(features, views[m])
        hidden = replace(seen.rows(rows), mask=mask[rows])
        out[rows, k] = record(raw_scores(model, hidden, batch_size, device)).contributions
    return out


def with_relations_of(features: Features, view: Features) -> Features:
    """`features` with the relation errors (and their channel parts) of the modalities `view` holds, by name."""
    if view.relation_errors is None:
        return features
    names = list(features.modalities)
    errors = np.zeros(features.mask.shape, np.float32) if features.relation_errors is None else \
        features.relation_errors.copy()
    for j, name in enumerate(view.modalities):
        if name in names:
            errors[:, names.index(name)] = view.relation_errors[:, j]
    parts = {**features.relation_channels, **{m: p for m, p in view.relation_channels.items() if m in names}}
    return replace(features, relation_errors=errors, relation_channels=parts)


def own_contributions(contributions: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """(N, M) each modality's contribution that no other modality explains: the least of its own (N, M) and of its
    contributions with each other voting modality hidden (`occlusion_contributions`, (N, M, M)) - what is left of
    an echo once the modality it echoes is hidden; NaN where absent."""
    with np.errstate(invalid="ignore"):
        least = np.fmin.reduce(hidden, axis=1)                  # over the hidden modality; all NaN: NaN
    return np.where(np.isfinite(contributions), np.fmin(contributions, least), np.nan)


CAUSE_SHARE = 0.5    # `cause_names`: a cause hidden takes at least this share of the largest contribution away, or the
                     # largest is named (chosen 2026-12-07 on the demo, `--audio --gradual` and `--gradual --stops`:
                     # a cross-modal fault otherwise named a third modality at 9-14 % of its ticks)


def cause_names(contributions: np.ndarray, hidden: np.ndarray, voting: np.ndarray,
                modalities: tuple[str, ...] | list[str], share: float | None = CAUSE_SHARE) -> np.ndarray:
    """(N, M) contributions, the (N, M, M) ones with each voting modality hidden (`occlusion_contributions`) and the
    (N, M) present voting modalities -> (N,) the voting modality with the largest `own_contributions`: the fault the
    others' errors follow (object array; None where fewer than two vote). Beside the largest contribution it tells a
    fault from its echo: an overheated process raises the camera's error too (the fused code carries it), but with
    the process hidden the camera's error is back to normal, while the process's stays high whichever other modality
    is hidden. A cause must explain the largest contribution where it is another's: hidden, it takes at least `share`
    of it away - else the modality with the largest contribution is named (a relation between two modalities broken,
    each side explained by the other, leaves only a third's noise); `share` None: the largest own one regardless."""
    own = own_contributions(contributions, hidden)
    out = np.full(len(own), None, object)
    named = (voting.sum(1) >= 2) & (voting & np.isfinite(own)).any(1)
    if named.any():
        largest = np.argmax(np.where(voting & np.isfinite(own), own, -np.inf)[named], 1)
        if share is not None:
            rows = np.flatnonzero(named)
            full = np.where(voting & np.isfinite(contributions), contributions, -np.inf)[rows]
            top = np.argmax(full, 1)
            left = hidden[rows, largest, top]                   # the largest contribution with the cause hidden
            top_value = full[np.arange(len(rows)), top]
            explained = (largest == top) | (top_value <= 0) | (left < share * top_value)
            largest = np.where(explained, largest, top)
        out[named] = np.asarray(modalities, object)[largest]
    return out


def _occlusion(model: DMAFN, inputs: dict, mask: torch.Tensor) -> np.ndarray:
    full = model.logit(model(inputs, mask), mask)
    cols = [full]
    for i in range(mask.shape[1]):
        hidden = mask.clone()
        hidden[:, i] = False
        cols.append(full - model.logit(model(inputs, hidden), hidden))
    return torch.stack(cols, 1).cpu().numpy()


def robust_scale(values: np.ndarray | Values) -> dict[str, float]:
    """Median and interquartile range (at least 1e-6) of the finite values; 0 and 1 when there are none.
    `values`: an array or `dmafn.validation.Values`."""
    values = as_values(values)
    if values.count() == 0:
        return {"median": 0.0, "scale": 1.0}
    q25, q50, q75 = values.quantiles([0.25, 0.5, 0.75])
    return {"median": float(q50), "scale": float(max(q75 - q25, 1e-6))}


@dataclass(frozen=True)
class Column:
    """Per-tick columns of validation raw scores that the normalisation is fitted on, (N, k): each modality's
    `log_error` (less the level expected at the tick's operating state where `calib` has a `baseline`), its
    `latent` term (k = 1 for a fused head's), its `contribution` under the normalisation `calib` fitted so far,
    or the operating `state` (k = S). Plain data, so a worker holding the raw scores can compute it."""

    kind: str
    calib: dict[str, Any] | None = None

    def __call__(self, raw: RawScores) -> np.ndarray:
        if self.kind == "log_error":
            return baseline_residuals(raw, self.calib or {})
        if self.kind == "state":
            return raw.state if raw.state is not None else np.zeros((len(raw.mask), 0))
        if self.kind == "latent":
            log_lat = np.log(np.maximum(raw.latent, 1e-12))
            return log_lat[:, None] if log_lat.ndim == 1 else np.where(raw.mask, log_lat, np.nan)
        if self.kind == "contribution":
            return _contributions(raw, self.calib)
        raise ValueError(f"unknown column {self.kind!r}")


class RawTicks:
    """Validation raw scores in memory, as `fit_normalisation` reads them (`pipelines.calibrate` holds them
    on workers instead)."""

    def __init__(self, raw: RawScores) -> None:
        self.raw = raw

    @property
    def latent_dims(self) -> int | None:
        """None without a latent term; 1 for a fused head's, 2 for one per modality (late fusion)."""
        return None if self.raw.latent is None else self.raw.latent.ndim

    @property
    def state_owners(self) -> tuple[str, ...]:
        """The modality of each operating-state column the ticks carry (none: no state)."""
        return self.raw.state_owners if self.raw.state is not None else ()

    def column(self, column: Column) -> list[Values]:
        return [ArrayValues(c) for c in column(self.raw).T]

    def total(self, sums: "BaselineSums") -> dict[str, np.ndarray]:
        """`sums` added up over the ticks."""
        return sums(self.raw)


def fit_normalisation(ticks: RawTicks, modalities: tuple[str, ...], detector: str, vote: str = "mean",
                      voting: tuple[str, ...] | None = None,
                      scale: str = ModelSpec.contribution_scale, state_baseline: bool = False,
                      robust: dict[str, Any] | None = None) -> dict[str, Any]:
    """Normalisation of each modality's contribution, fitted on validation ticks (`ticks.column(Column)`:
    the finite values of each column, wherever they are held); `voting`: the modalities whose contributions
    make the fused score (default all); `scale`: `robust` (median and IQR of the log error) or `tail` (that
    value put on its tail surprise among the validation ticks, `fit_tail`); `state_baseline`: each modality's
    log error taken relative to the level expected at the tick's operating state (`fit_baseline`); `robust`:
    `fit_robust_scales` of the same arguments on the same ticks, already fitted (not asked of the ticks again)."""
    if scale not in CONTRIBUTION_SCALES:
        raise ValueError(f"unknown contribution scale {scale!r} ({', '.join(CONTRIBUTION_SCALES)})")
    calib = dict(robust) if robust is not None else fit_robust_scales(ticks, modalities, detector, vote, voting,
                                                                      state_baseline)
    if detector == "classifier":
        return calib
    chosen = calib.pop("voting", None)
    if scale == "tail":
        calib["tail"] = {m: fit_tail(v) for m, v in zip(modalities, ticks.column(Column("contribution", calib)))}
    spread = np.array([v.quantiles([0.99])[0] if v.count() else 1.0
                       for v in ticks.column(Column("contribution", calib))])
    weights = 1.0 / np.maximum(spread, 0.5)               # noisy modalities get less say in 'weighted'
    calib["weights"] = (weights / weights.sum() * len(modalities)).tolist()
    if chosen is not None:
        calib["voting"] = chosen
    return calib


def fit_robust_scales(ticks: RawTicks, modalities: tuple[str, ...], detector: str, vote: str = "mean",
                      voting: tuple[str, ...] | None = None, state_baseline: bool = False) -> dict[str, Any]:
    """`fit_normalisation`'s first part: the state baseline (with `state_baseline`), each modality's median and
    IQR of its log error and the latent term's - the contributions on the `robust` scale, without the vote's
    weights (what `dmafn.calibration.OutlierTicks` reads)."""
    if detector == "classifier":
        return {"detector": detector, "vote": vote, "modalities": list(modalities)}
    if voting is not None and (not voting or set(voting) - set(modalities)):
        raise ValueError(f"voting modalities {sorted(voting)} must be a non-empty subset of {list(modalities)}")
    voting = None if voting is None or set(voting) == set(modalities) else voting   # all vote: nothing to store
    calib: dict[str, Any] = {"detector": detector, "vote": vote, "modalities": list(modalities),
                             "held_reading": "least"}       # `settle_held`; a calibration without it: as held
    if state_baseline:
        calib.update(fit_baseline(ticks, tuple(modalities)))
    calib["contribution"] = {m: robust_scale(v) for m, v in
                             zip(modalities, ticks.column(Column("log_error", calib)))}
    if ticks.latent_dims is not None:
        latent = [robust_scale(v) for v in ticks.column(Column("latent"))]
        calib["latent"] = dict(zip(modalities, latent)) if ticks.latent_dims == 2 else latent[0]
    if voting is not None:
        calib["voting"] = [m for m in modalities if m in voting]
    return calib


def voting_mask(mask: np.ndarray, calib: dict[str, Any]) -> np.ndarray:
    """(N, M) the present modalities that vote; a tick where only non-voting ones are present lets them vote
    (a score rather than none)."""
    if "voting" not in calib:
        return mask
    votes = mask & np.isin(np.asarray(calib["modalities"]), calib["voting"])[None, :]
    return np.where(votes.any(1, keepdims=True), votes, mask)


STATE_LEVELS = (0.01, 0.25, 0.5, 0.75, 0.99)   # a state column is held within its 1-99 % quantiles of the
                                               # validation ticks, with hinges at its quartiles
SPEED_LEVELS = (0.0, 0.5, 0.9, 0.99, 1.0)      # a speed column (`dmafn.features.SPEED`): within its range,
                                               # hinges in its tail, where a start moves the state
BASELINE_RIDGE = 1e-3                          # ridge of the baseline regression, relative to its design's scale
SPREAD_LIMITS = (0.5, 4.0)                     # a state's expected |residual| is held within these multiples of the
                                               # validation mean's: its residual at most doubled, at least quartered
SPREAD_MIN_EXPLAINED = 0.5                     # share of a modality's log-error variance its state baseline must
                                               # explain before the spread is read at the state too


def _state_basis(state: np.ndarray, spec: dict[str, Any], columns: list[int]) -> np.ndarray:
    """(N, 4 k + 1) piecewise-linear basis of k state columns: each held within its validation range (a missing
    value at its median), itself and its hinges at the quartiles, and a constant."""
    n = len(state)
    if not columns:
        return np.ones((n, 1))
    lo, hi = np.asarray(spec["lo"])[columns], np.asarray(spec["hi"])[columns]
    x = state[:, columns].astype(np.float64)
    x = np.clip(np.where(np.isfinite(x), x, np.asarray(spec["median"])[columns]), lo, hi)
    knots = np.asarray(spec["knots"])[columns]                                  # (k, 3)
    hinges = np.maximum(x[:, :, None] - knots[None], 0.0).reshape(n, -1)
    return np.concatenate([x, hinges, np.ones((n, 1))], 1)


def baseline_columns(owners: list[str], modality: str) -> list[int]:
    """The state columns a modality's baseline reads: every other modality's (its own level or speed would explain
    its own anomaly away)."""
    return [j for j, owner in enumerate(owners) if state_owner(owner) != modality]


def baseline_min_ticks(columns: int) -> int:
    """The validation ticks a baseline on `columns` state columns needs: 10 per weight of its basis."""
    return 10 * (4 * columns + 1)


@dataclass(frozen=True)
class BaselineSums:
    """Per modality, over the ticks where the modality and every state column it reads are present, added up
    wherever the ticks are held: the normal equations of its baseline regression (the log error on the state
    basis, `calib['state']`) as {m: (X'X, X'y, n) packed as one array}; with `residuals`, the squared residuals
    each of its fitted regressions (`calib['baseline']`: the full one, then its fallbacks) leaves, then the full
    one's absolute residuals on its basis (X'|r|, for the spread at the state), {m: (sums of squares per regression,
    X'|r|)} - summed apart, so no difference of large sums sets a spread."""

    calib: dict[str, Any]
    residuals: bool = False

    def __call__(self, raw: RawScores) -> dict[str, np.ndarray]:
        spec, out = self.calib["state"], {}
        log_err = np.log(np.maximum(raw.errors, 1e-12))
        for i, m in enumerate(self.calib["modalities"]):
            columns = baseline_columns(spec["owners"], m)
            fitted = self.calib["baseline"].get(m) if self.residuals else None
            if self.residuals and fitted is None:
                continue
            d = 4 * len(columns) + 1
            rows = np.isfinite(log_err[:, i]) & raw.mask[:, i]
            state = raw.state_of(m)
            if state is not None and columns:
                rows &= np.isfinite(state[:, columns]).all(1)
            if state is None or not columns or not rows.any():
                out[m] = np.zeros(1 + len(fitted["fallbacks"]) + d if fitted else d * d + d + 1)
                continue
            x = _state_basis(state[rows], spec, columns)
            y = log_err[rows, i]
            if fitted is None:
                out[m] = np.concatenate([(x.T @ x).ravel(), x.T @ y, [len(y)]])
                continue
            squares = [np.sum((y - x[:, _basis_index(len(columns), kept)] @ np.asarray(model["weights"])) ** 2)
                       for kept, model in _models(fitted, spec["owners"])]
            out[m] = np.concatenate([squares, x.T @ np.abs(y - x @ np.asarray(fitted["weights"]))])
        return out


def _basis_index(k: int, kept: list[int]) -> np.ndarray:
    """The places in `_state_basis` of k columns that belong to the kept ones (by position), and the constant."""
    return np.array([*kept, *(k + 3 * i + t for i in kept for t in range(3)), 4 * k], np.int64)


def _kept(columns: list[int], owners: list[str], dropped: str | None) -> list[int]:
    """The positions among a baseline's `columns` that its regression without `dropped`'s levels keeps (None:
    the full regression, all of them; '*': the mean alone, none)."""
    if dropped is None:
        return list(range(len(columns)))
    return [] if dropped == "*" else [p for p, j in enumerate(columns) if state_owner(owners[j]) != dropped]


def _models(fitted: dict[str, Any], owners: list[str]) -> list[tuple[list[int], dict[str, Any]]]:
    """A baseline's regressions: (kept column positions, the regression), the full one first, then its fallbacks."""
    columns = fitted["columns"]
    return [(_kept(columns, owners, None), fitted),
            *((_kept(columns, owners, o), model) for o, model in fitted["fallbacks"].items())]


def _ridge_weights(xtx: np.ndarray, xty: np.ndarray) -> list[float]:
    """Ridge weights on a basis whose last column is the constant (not shrunk)."""
    d = len(xty)
    ridge = BASELINE_RIDGE * np.trace(xtx) / d * np.eye(d)
    ridge[-1, -1] = 0.0
    return np.linalg.solve(xtx + ridge, xty).tolist()


def fit_baseline(ticks: RawTicks, modalities: tuple[str, ...]) -> dict[str, Any]:
    """Each modality's expected log error at the tick's operating state (`dmafn.features.operating_state`: the
    levels of the other modalities' channels), fitted on the validation ticks by a ridge regression on a
    piecewise-linear basis of each state column. A reconstruction error often grows with load (a vibration
    window's error with its amplitude), so normal ticks at high load outrank faults at low load; scored
    against its baseline, each modality's error says how unusual it is where the machine is operating.
    With the others' speed columns (versions with `model.state_speed`), also how fast it got there: a machine
    starting up passes through its states faster than the lagging ones follow, and the validation days' starts
    teach how much higher the error then runs (hinges in the speed's tail, `SPEED_LEVELS`; the spread reads the
    levels only).
    A tick where a modality the state reads is absent is scored by the regression without that modality's
    columns (`fallbacks`, fitted on the same ticks; two or more absent: the mean alone), its residual put on the
    full regression's spread, so the contributions keep the false-alarm rate they were calibrated for.
    How far the error strays from its level can depend on the state too (a machine running down, at rest or at
    low load: an error that spans decades; at full load: a steady one): where the state explains at least
    `SPREAD_MIN_EXPLAINED` of a modality's log-error variance, the full regression's absolute residual is fitted
    linearly on the same state columns (`spread`, from the residual pass's sums) and each residual is read in
    units of the spread expected at its state relative to the validation ticks' mean (`state_spread`,
    `SPREAD_LIMITS`; elsewhere, and in calibrations before 2026-12-07, one spread).
    {} without a state, else `state` (its columns' owners, ranges, medians and knots) and `baseline` (per
    modality fitted: its columns, weights on their basis, residual std, spread, fallbacks, ticks fitted on)."""
    owners = list(ticks.state_owners)
    if not owners:
        return {}
    values = ticks.column(Column("state"))
    qs = np.array([v.quantiles(SPEED_LEVELS if is_speed(owner) else STATE_LEVELS) if v.count()
                   else np.zeros(len(STATE_LEVELS)) for v, owner in zip(values, owners)])
    state = {"owners": owners, "lo": qs[:, 0].tolist(), "hi": qs[:, 4].tolist(), "median": qs[:, 2].tolist(),
             "knots": qs[:, 1:4].tolist()}
    totals = ticks.total(BaselineSums({"modalities": list(modalities), "state": state}))
    baseline, normal = {}, {}
    for m in modalities:
        columns = baseline_columns(owners, m)
        k = len(columns)
        d = 4 * k + 1
        packed = totals[m]
        n = int(packed[-1])
        if not columns or n < baseline_min_ticks(k):
            continue
        xtx, xty = packed[:d * d].reshape(d, d), packed[d * d:d * d + d]
        normal[m] = xtx
        weights = {}                     # the full regression (None), one without each modality read, the mean
        for dropped in [None, *dict.fromkeys(state_owner(owners[j]) for j in columns), "*"]:
            idx = _basis_index(k, _kept(columns, owners, dropped))
            weights[dropped] = _ridge_weights(xtx[np.ix_(idx, idx)], xty[idx])
        baseline[m] = {"columns": columns, "weights": weights.pop(None),
                       "fallbacks": {o: {"weights": w} for o, w in weights.items()}, "ticks": n}
    if not baseline:                    # too few ticks for any: the state alone says what was looked at
        return {"state": state, "baseline": {}}
    calib = {"modalities": list(modalities), "state": state, "baseline": baseline}
    for m, sums in ticks.total(BaselineSums(calib, residuals=True)).items():
        fitted = baseline[m]
        models = _models(fitted, owners)
        for (_, model), total in zip(models, sums):
            model["residual_std"] = float(np.sqrt(total / fitted["ticks"])) or 1e-9
        absolute = sums[len(models):]                   # X'|r|: its last entry (the constant's) is the sum of |r|
        alone = fitted["fallbacks"].get("*", {}).get("residual_std")
        explained = 0.0 if not alone else 1 - (fitted["residual_std"] / alone) ** 2
        if absolute[-1] > 0 and explained >= SPREAD_MIN_EXPLAINED:
            k = len(fitted["columns"])              # the spread: linear in each level column, no hinges
            linear = np.array([*(p for p, j in enumerate(fitted["columns"]) if not is_speed(owners[j])), 4 * k])
            weights = np.zeros(4 * k + 1)
            weights[linear] = _ridge_weights(normal[m][np.ix_(linear, linear)], absolute[linear])
            fitted["spread"] = {"weights": weights.tolist(), "mean": float(absolute[-1] / fitted["ticks"])}
    return {"state": state, "baseline": baseline}


def baseline_residuals(raw: RawScores, calib: dict[str, Any]) -> np.ndarray:
    """(N, M) each modality's log error less its expected level at the ticks' operating state (`fit_baseline`),
    on the full regression's spread; the log error itself where a modality has no baseline. A version fitted on
    another layout of the state (its owners) is refused."""
    log_err = np.log(np.maximum(raw.errors, 1e-12))
    if not calib.get("baseline"):
        return log_err
    spec = calib["state"]
    if raw.state is None or list(raw.state_owners) != list(spec["owners"]):
        raise ValueError(f"the calibration expects an operating state of {spec['owners']} and the ticks carry "
                         f"{list(raw.state_owners)}: score with the spec the model version was trained with")
    owners = np.asarray([state_owner(o) for o in spec["owners"]])
    out = log_err.copy()
    for i, m in enumerate(calib["modalities"]):
        fitted = calib["baseline"].get(m)
        if fitted is None:
            continue
        columns, state = fitted["columns"], raw.state_of(m)                    # a held error: its held state
        basis = _state_basis(state, spec, columns)
        pred = basis @ np.asarray(fitted["weights"])
        spread = state_spread(basis, fitted)
        fallbacks = fitted.get("fallbacks", {})
        absent = ~np.isfinite(state[:, columns])                                # (N, k)
        gone = {o: absent[:, owners[columns] == o].any(1) for o in fallbacks if o != "*"}
        count = sum(gone.values(), np.zeros(len(pred), int))
        k = len(columns)
        for o, rows in [*gone.items(), ("*", count > 1)]:
            rows = rows & (count == 1) if o != "*" else rows
            if not rows.any():
                continue
            kept = _basis_index(k, _kept(columns, owners, o))
            pred[rows] = basis[np.ix_(rows, kept)] @ np.asarray(fallbacks[o]["weights"])
            spread[rows] = fitted["residual_std"] / fallbacks[o]["residual_std"]
        out[:, i] = (log_err[:, i] - pred) * spread
    return out


def state_spread(basis: np.ndarray, fitted: dict[str, Any]) -> np.ndarray:
    """(N,) what a baseline's residual is multiplied by at each tick (`basis`: `_state_basis` of its state): the
    validation ticks' mean absolute residual over the one expected at the tick's state (`fitted['spread']`, held
    within `SPREAD_LIMITS` of that mean) - 1 everywhere for a calibration without a spread."""
    fit = fitted.get("spread")
    if fit is None:
        return np.ones(len(basis))
    lo, hi = SPREAD_LIMITS
    expected = basis @ np.asarray(fit["weights"])
    return fit["mean"] / np.clip(expected, lo * fit["mean"], hi * fit["mean"])


def settle_held(raw: RawScores, calib: dict[str, Any]) -> RawScores:
    """Under a calibration that reads held payloads by their smaller reading (`calib["held_reading"]` `"smaller"`,
    versions since 2026-12-06): each held modality's error, channel parts and operating state at each tick - the held
    reading (`hold_payload_errors`) or the tick's own, whichever contributes less. A payload held after the machine
    moved is judged both against the state it was taken in and against the machine now; it counts as anomalous only
    if it is both - a frame taken mid run-up, unusual for its moment, that fits the running pump it is read
    beside, is not held into the running minutes as an anomaly, and a frame of a running pump read beside a stopped
    one is still judged as taken. Under a calibration that reads the least of three (`"least"`, versions since
    2026-12-07 night), a frame or clip that came while the machine moved (`RawScores.prior_state`) is also read
    against the state at the tick before it came, and counts by the least of the three: a frame taken while a pump
    ran down, first read at a tick where it is still, is judged against the pump it pictured too. The result
    carries no fresh readings (`RawScores.fresh_errors`); without them, or under an older calibration, `raw`
    itself."""
    if not raw.fresh_errors or calib.get("held_reading") not in ("smaller", "least"):
        return raw
    held_view = replace(raw, fresh_errors={}, fresh_channel_errors={}, prior_state={})
    errors, fresh_state = raw.errors.copy(), dict(raw.held_state)
    for m in raw.fresh_errors:
        errors[:, calib["modalities"].index(m)] = raw.fresh_errors[m]
        fresh_state.pop(m, None)
    fresh_view = replace(held_view, errors=errors, held_state=fresh_state,
                         channel_errors={**raw.channel_errors, **raw.fresh_channel_errors})
    as_held, as_fresh = _contributions(held_view, calib), _contributions(fresh_view, calib)
    prior = raw.prior_state if calib.get("held_reading") == "least" else {}
    if prior:                  # the held error read against the state at the tick before its row came - only at the
        came = np.zeros(len(raw.mask), bool)          # ticks whose frame came while the machine moved: elsewhere the
        for m, p in prior.items():                    # prior is the held state, and so is its reading
            held = raw.held_state.get(m, raw.state)
            came |= ~((p == held) | (np.isnan(p) & np.isnan(held))).all(1)
        as_prior = np.full(as_held.shape, np.inf)
        if came.any():
            moved = replace(held_view, held_state={**raw.held_state, **prior}).rows(came)
            as_prior[came] = _contributions(moved, calib)      # row by row, as on the whole batch
    settled = replace(held_view, errors=raw.errors.copy(), channel_errors=dict(raw.channel_errors),
                      held_state=dict(raw.held_state))
    for m in raw.fresh_errors:
        i = calib["modalities"].index(m)
        fresher = as_fresh[:, i] < as_held[:, i]                        # NaN (absent) on either side: as held
        settled.errors[:, i] = np.where(fresher, raw.fresh_errors[m], raw.errors[:, i])
        if m in raw.fresh_channel_errors and m in raw.channel_errors:
            settled.channel_errors[m] = np.where(fresher[:, None], raw.fresh_channel_errors[m], raw.channel_errors[m])
        if m in raw.held_state:
            settled.held_state[m] = np.where(fresher[:, None], raw.state, raw.held_state[m])
        if m in prior:                                              # the least of the three
            earlier = as_prior[:, i] < np.fmin(as_fresh[:, i], as_held[:, i])
            settled.errors[:, i] = np.where(earlier, raw.errors[:, i], settled.errors[:, i])
            if m in raw.channel_errors:
                settled.channel_errors[m] = np.where(earlier[:, None], raw.channel_errors[m], settled.channel_errors[m])
            settled.held_state[m] = np.where(earlier[:, None], prior[m], settled.held_state.get(m, raw.state))
    return settled


def _contributions(raw: RawScores, calib: dict[str, Any]) -> np.ndarray:
    raw = settle_held(raw, calib)
    log_err = baseline_residuals(raw, calib)
    cols = []
    for i, m in enumerate(calib["modalities"]):
        c = calib["contribution"][m]
        cols.append((log_err[:, i] - c["median"]) / c["scale"])
    contrib = np.stack(cols, 1) if cols else np.zeros((len(raw.mask), 0))
    if raw.latent is not None and "latent" in calib:
        # the latent term only adds evidence: a code that looks more typical than usual does not lower a score
        log_lat = np.log(np.maximum(raw.latent, 1e-12))
        if log_lat.ndim == 2:           # late fusion: each modality's own head
            lat = np.stack([(log_lat[:, i] - calib["latent"][m]["median"]) / calib["latent"][m]["scale"]
                            for i, m in enumerate(calib["modalities"])], 1)
            contrib = contrib + np.maximum(lat, 0.0)
        else:                           # one fused head: shared by the present modalities
            lat = (log_lat - calib["latent"]["median"]) / calib["latent"]["scale"]
            n_present = np.maximum(raw.mask.sum(1, keepdims=True), 1)
            contrib = contrib + np.maximum(lat, 0.0)[:, None] / n_present
    if "tail" in calib:
        contrib = np.stack([tail_surprise(contrib[:, i], calib["tail"][m])
                            for i, m in enumerate(calib["modalities"])], 1) if contrib.shape[1] else contrib
    return np.where(raw.mask, contrib, np.nan)


TAIL_LEVEL = 0.99       # above this quantile of the validation values the tail is an exponential fit
TAIL_MIN_VALUES = 1000  # fewer validation values than this: the top 1 % is a handful of ticks (train warns)
_TAIL_KNOTS = np.linspace(0.0, TAIL_LEVEL, 100)


def fit_tail(values: np.ndarray | Values) -> dict[str, Any]:
    """How rare each value is among validation `values` (an array, NaN ignored, or `dmafn.validation.Values`):
    their quantiles at 0-99 % and an exponential fit (rate) to the excesses over the 99 % quantile, for
    `tail_surprise`; `n` values."""
    values = as_values(values)
    n = values.count()
    if n == 0:
        return {"levels": [0.0], "knots": [0.0], "rate": 1.0, "n": 0}
    knots = np.maximum.accumulate(values.quantiles(_TAIL_KNOTS))
    knots, first = np.unique(knots, return_index=True)                  # ties: one knot, its lowest level
    _, mean_excess = values.excess_mean(knots[-1])       # a count and a sum where the values lie, not the values
    # mean excess at least 0.05 (contributions are in IQR units): a tail never steeper than that
    rate = 1.0 / max(mean_excess, 0.05)
    return {"levels": _TAIL_KNOTS[first].tolist(), "knots": knots.tolist(), "rate": rate, "n": n}


def tail_surprise(values: np.ndarray, tail: dict[str, Any]) -> np.ndarray:
    """-log10 of the share of validation ticks expected at or above each value: 0 at or below the validation
    minimum, 2 at its 99 % quantile, and beyond it the fitted exponential tail (one more unit per 1/rate x
    ln 10 of excess) - contributions of every modality in the same units, whatever their spread or tails."""
    knots, levels = np.asarray(tail["knots"]), np.asarray(tail["levels"])
    top = knots[-1]
    inside = np.interp(values, knots, levels, left=0.0, right=levels[-1])
    share = np.where(values > top, (1.0 - levels[-1]) * np.exp(-tail["rate"] * np.maximum(values - top, 0.0)),
                     1.0 - inside)
    return np.where(np.isfinite(values), -np.log10(np.maximum(share, 1e-300)), np.nan)


def vote(contributions: np.ndarray, mask: np.ndarray, how: str, weights: list[float] | None = None) -> np.ndarray:
    """Fuse per-modality contributions (N, M) over the present modalities into one score (N,)."""
    c = np.where(mask, contributions, 0.0)
    n = mask.sum(1)
    safe_n = np.maximum(n, 1)
    if how == "mean":
        fused = c.sum(1) / safe_n
    elif how == "max":
        fused = np.where(mask, contributions, -np.inf).max(1) if c.shape[1] else np.zeros(len(c))
    elif how == "weighted":
        w = np.asarray(weights if weights is not None else np.ones(c.shape[1]))[None, :] * mask
        fused = (c * w).sum(1) / np.maximum(w.sum(1), 1e-9)
    elif how == "attention":
        logits = np.where(mask, contributions, -np.inf)
        logits = logits - np.max(np.where(mask, logits, -1e30), 1, keepdims=True)
        att = np.where(mask, np.exp(logits), 0.0)
        fused = (c * att).sum(1) / np.maximum(att.sum(1), 1e-12)
    else:
        raise ValueError(f"unknown vote {how!r} ({', '.join(VOTES)})")
    return np.where(n > 0, fused, np.nan)


def to_record(raw: RawScores, calib: dict[str, Any], modalities: tuple[str, ...]) -> ScoreRecord:
    """Calibrated contributions and fused score."""
    if calib["detector"] == "classifier":
        contrib = np.where(raw.mask, raw.errors, np.nan)
        score = np.where(raw.mask.any(1), raw.latent, np.nan)
        return ScoreRecord(score=score, contributions=contrib, mask=raw.mask, modalities=modalities)
    contrib = _contributions(raw, calib)
    score = vote(contrib, voting_mask(raw.mask, calib), calib.get("vote", "mean"), calib.get("weights"))
    return ScoreRecord(score=score, contributions=contrib, mask=raw.mask, modalities=modalities)
