"""A synthetic multi-modal fleet: pumps whose modalities are tied together by a hidden load.

Normal behaviour: a per-pump load L(t) in [0, 1] (daily cycle + slow drift) drives
  process   (tabular, ~1/min)   temperature follows a lagged load, pressure follows load
  vibration (timeseries, 1 Hz)  amplitude grows with load
  camera    (image, ~every 5 min, PNG) the pressure gauge: its needle angle shows the process load
  logs      (text, irregular)   message rate and wording follow load
  mic       (audio, optional, ~every 5 min) a hum whose pitch and level follow load
Each pump has its own operating point (base temperature and pressure).

Injected anomalies (labels: entity, start, end, kind):
  vibration   single modality: vibration becomes rough (noise and a harmonic)
  overheat    single modality: temperature far above its range
  log_errors  single modality: error messages appear in the log
  camera      single modality: the camera image is fogged
  cross_modal only across modalities: the process side (temperature, pressure and the gauge the
              camera sees) follows a load shifted by 0.45 while the mechanical side (vibration, logs)
              follows the true load; every value stays in its normal range, only their relation breaks.
  squeal      single modality, with `audio` only (any fleet): a bearing's whine - a tone of its own pitch
              (1.0-1.8 kHz, drawn per event) in the microphone's clips over the hum, at about half the hum's
              level at mean load; nothing else changes (the hum itself goes on following load).

The shifted fleet (`SyntheticConfig(shifted=True)`, `dmafn generate --shifted`) is for evaluation only: other
machines (hotter and less load-sensitive, a two-shift load cycle, a faster shaft, log lines that carry
numbers and ids) and other anomaly shapes, none of which the demo's settings were chosen on:
  slow_drift       temperature creeps away from its relation with load over 45-90 minutes (up to +6 C, inside
                   the normal range) - visible only against load, slowly
  intermittent     vibration rough in bursts of 20-90 s, smooth in between
  novel_logs       a burst of log lines whose templates never occur on normal days
  camera_fade      the camera image degrades gradually (fog rising from nothing to full over the event)
  cross_modal      the process side follows a load shifted by 0.35
With `slow_drifts` (`dmafn generate --slow-drifts`), the demo's machines also get the slow drift as a sixth
kind (six anomalies per pump and day): a labelled fleet of the demo's family on which a setting for slow
drifts can be chosen without looking at the shifted fleet. With `gradual` (`dmafn generate --gradual`) they
get the three gradual shapes: slow_drift, intermittent and camera_fade as sixth to eighth kinds (eight a
day), for choosing settings for those shapes the same way.
Besides, in the shifted fleet each pump's vibration sensor fails for 2-4 hours once on a scored day (rows
missing, not labelled: an absent modality is not an anomaly, and scores must not jump for it). `outages`
(`dmafn generate --outages`, with any fleet of the demo's family) gives the design fleets the same failure, so
that how scores hold while a modality is gone for hours can be measured, and settings chosen, without the
shifted fleet. `dead_channels` (`dmafn generate --dead-channels`, with any fleet) makes one channel of a
modality fall silent for 2-4 hours on each pump's first scored day while its other channels go on: the vibration's
`ay` around the day's first vibration fault (or intermittent burst) and the process's `pressure` around its first
overheat (or slow drift) - the rows are kept, the channel null, as a historian writes a dead tag; nothing else
changes. `ac_vibration` (`dmafn generate --ac-vibration`, with any fleet) makes the vibration's third axis
oscillate too (at twice the shaft's frequency) instead of carrying half the amplitude as a steady part, as a real
accelerometer's axes do: every axis then has a window mean near zero whatever the load, and the load shows only
in how far the axes swing. The flag changes no other value, row or label. `stops` (`dmafn generate --stops`, with
any fleet) stops each pump 2-4 times a day, training days too, for 20-120 minutes at least 30 minutes from any
labelled event (running down and up over `STOP_RAMP_S`: no load, a still shaft, the pressure at rest, the
controller's `INFO pump stopped` / `INFO pump started` lines), unlabelled: a plant's routine stops are normal
operation. Its log lines change how later draws fall, so the other pumps' events differ from the fleet without it.
"""
from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dmafn.spec import DAY_US

ANOMALY_KINDS = ("vibration", "overheat", "log_errors", "camera", "cross_modal")
AUDIO_KINDS = ("squeal",)                 # with `audio`: kinds that only the microphone hears, after the fleet's own
SQUEAL_HZ = (1000.0, 1800.0)              # a squeal's pitch range (one pitch per event, under a 4 kHz clip's Nyquist)
SQUEAL_LEVEL = 0.22                       # its amplitude: about half the hum's at mean load (0.2 + 0.5 x 0.5)
SHIFTED_KINDS = ("slow_drift", "intermittent", "novel_logs", "camera_fade", "cross_modal")
GRADUAL_KINDS = ("slow_drift", "intermittent", "camera_fade")
_S = 1_000_000  # microseconds per second


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and shape of the generated fleet."""

    entities: int = 4
    start: dt.date = dt.date(2024, 1, 1)
    days: int = 6
    clean_days: int = 3          # the first days carry no anomalies (the training period)
    anomalies_per_day: int | None = None   # per entity and scored day; None: one of each kind
    image_size: int = 32
    audio: bool = False
    audio_rate: int = 4000
    seed: int = 0
    shifted: bool = False        # the evaluation-only fleet: other machines and anomaly shapes (module doc)
    slow_drifts: bool = False    # the demo's machines with slow drifts as a sixth kind: a fleet to choose on
    gradual: bool = False        # the demo's machines with slow_drift, intermittent and camera_fade too
    outages: bool = False        # each pump's vibration sensor fails for 2-4 h once on a scored day (the shifted
                                 # fleet always has it)
    dead_channels: bool = False  # vibration `ay` and process `pressure` null for 2-4 h around a fault (module doc)
    ac_vibration: bool = False   # the vibration's third axis oscillates (no steady part): every axis averages ~0
    stops: bool = False          # each pump stops 2-4 times a day for 20-120 min, training days too (normal, unlabelled)

    @property
    def kinds(self) -> tuple[str, ...]:
        if self.shifted:
            kinds = SHIFTED_KINDS
        elif self.gradual:
            kinds = (*ANOMALY_KINDS, *GRADUAL_KINDS)
        else:
            kinds = (*ANOMALY_KINDS, "slow_drift") if self.slow_drifts else ANOMALY_KINDS
        return (*kinds, *AUDIO_KINDS) if self.audio else kinds

    @property
    def events_per_day(self) -> int:
        """Anomalies per entity and scored day: `anomalies_per_day`, else one of each kind."""
        return self.anomalies_per_day or len(self.kinds)


@dataclass(frozen=True)
class _Machine:
    """How a pump of a fleet behaves: load cycle, process response, shaft, log rate and wording."""

    cycle_minutes: float = 1440        # the load's main cycle
    temp_base: tuple[float, float] = (40, 8)        # base temperature: low + spread * U(0, 1)
    temp_gain: float = 25              # degrees from no load to full load
    temp_tau: float = 12               # lag of the temperature behind the load (in 10 s steps)
    pressure_base: tuple[float, float] = (3, 2)
    pressure_gain: float = 4
    shaft_period_s: float = 6.3
    vib_amp: tuple[float, float] = (0.2, 1.0)       # amplitude at no load, gain with load
    log_rate: tuple[float, float] = (0.3, 2.0)      # lines per minute at no load, gain with load
    cross_shift: float = 0.45


_DEMO_MACHINE = _Machine()
_SHIFTED_MACHINE = _Machine(cycle_minutes=720, temp_base=(55, 10), temp_gain=18, temp_tau=20, pressure_base=(5, 3),
                            pressure_gain=6, shaft_period_s=4.1, vib_amp=(0.35, 0.8), log_rate=(0.5, 1.5),
                            cross_shift=0.35)


@dataclass
class SyntheticData:
    tables: dict[str, pa.Table]
    labels: pa.Table
    config: SyntheticConfig


def _load_curve(rng: np.random.Generator, seconds: int, phase: float, cycle_minutes: float = 1440) -> np.ndarray:
    minutes = seconds // 60 + 2
    drift = np.zeros(minutes)
    noise = rng.normal(0, 0.04, minutes)
    for i in range(1, minutes):
        drift[i] = 0.97 * drift[i - 1] + noise[i]
    t_min = np.arange(minutes)
    per_min = 0.5 + 0.3 * np.sin(2 * np.pi * t_min / cycle_minutes + phase) + drift
    per_min += 0.1 * np.sin(2 * np.pi * t_min / 97 + 2 * phase)
    return np.clip(np.interp(np.arange(seconds) / 60.0, t_min, per_min), 0.02, 0.98)


def _ema(x: np.ndarray, tau: float) -> np.ndarray:
    alpha, out, acc = 1.0 / tau, np.empty_like(x), x[0]
    for i, v in enumerate(x):
        acc += alpha * (v - acc)
        out[i] = acc
    return out


def _draw_events(rng: np.random.Generator, cfg: SyntheticConfig, seconds: int) -> list[tuple[int, int, str]]:
    events: list[tuple[int, int, str]] = []
    for day in range(cfg.clean_days, cfg.days):
        slots = rng.choice(np.arange(2, 24 * 2 - 2), size=cfg.events_per_day, replace=False)
        kinds = rng.permutation(np.resize(cfg.kinds, cfg.events_per_day))
        for slot, kind in zip(sorted(slots), kinds):
            start = day * 86400 + int(slot) * 1800 + int(rng.integers(0, 600))
            minutes = int(rng.integers(45, 91)) if kind == "slow_drift" else int(rng.integers(20, 41))
            events.append((start, min(start + minutes * 60, seconds - 1), str(kind)))
    return events


def _mask(events: list[tuple[int, int, str]], kind: str, seconds: int) -> np.ndarray:
    mask = np.zeros(seconds, bool)
    for start, end, k in events:
        if k == kind:
            mask[start:end + 1] = True
    return mask


def _ramp(events: list[tuple[int, int, str]], kind: str, seconds: int) -> np.ndarray:
    """0 outside the events of `kind`, rising linearly from 0 to 1 over each."""
    ramp = np.zeros(seconds)
    for start, end, k in events:
        if k == kind:
            ramp[start:end + 1] = np.linspace(0, 1, end - start + 1)
    return ramp


_DEAD_CHANNELS = (("vibration", "ay", ("vibration", "intermittent")),       # (table, column, the faults it spans)
                  ("process", "pressure", ("overheat", "slow_drift")))


def _silence_channels(e: int, cfg: SyntheticConfig, events: list[tuple[int, int, str]],
                      tables: dict[str, tuple[dict, np.ndarray]]) -> None:
    """`dead_channels`: each of `_DEAD_CHANNELS` NaN (written as null) for 2-4 h around the first event of its kinds
    on the first scored day, from a draw of its own (nothing else changes)."""
    draw = np.random.default_rng([cfg.seed, e, 11])
    for table, column, kinds in _DEAD_CHANNELS:
        starts = [(s, end) for s, end, k in events if k in kinds and s < (cfg.clean_days + 1) * 86400]
        if not starts:
            continue
        first, last = starts[0]
        start = max(first - int(draw.integers(1800, 5400)), cfg.clean_days * 86400)
        end = max(start + int(draw.integers(2 * 3600, 4 * 3600)), last + 600)
        values, times = tables[table]
        values[column] = np.where((times >= start) & (times < end), np.nan, values[column])


def _squeal_pitch(e: int, cfg: SyntheticConfig, events: list[tuple[int, int, str]], seconds: int) -> np.ndarray:
    """(seconds,) the pitch in Hz of the squeal sounding at each second (0: none), one pitch per `squeal` event in
    `SQUEAL_HZ`, from a draw of its own."""
    draw = np.random.default_rng([cfg.seed, e, 17])
    pitch = np.zeros(seconds)
    for start, end, kind in events:
        if kind == "squeal":
            pitch[start:end + 1] = draw.uniform(*SQUEAL_HZ)
    return pitch


STOP_RAMP_S = 120      # `stops`: seconds a pump takes to run down or up


def _draw_stops(e: int, cfg: SyntheticConfig, events: list[tuple[int, int, str]], seconds: int) -> np.ndarray:
    """`stops`: (seconds,) how far the pump runs, 1 running, 0 stopped - 2-4 stops a day of 20-120 minutes, each
    running down and up over `STOP_RAMP_S`, at least 30 minutes from any labelled event; from a draw of its own."""
    draw = np.random.default_rng([cfg.seed, e, 13])
    busy = np.zeros(seconds, bool)
    for start, end, _ in events:
        busy[max(start - 1800, 0):end + 1800] = True
    running = np.ones(seconds)
    ramp = np.linspace(1, 0, STOP_RAMP_S)
    for day in range(cfg.days):
        for _ in range(int(draw.integers(2, 5))):
            start = day * 86400 + int(draw.integers(0, 86400 - 3 * 3600))
            end = start + int(draw.integers(20, 121)) * 60
            if busy[start:end + STOP_RAMP_S].any() or end + STOP_RAMP_S >= seconds:
                continue
            running[start:start + STOP_RAMP_S] = np.minimum(running[start:start + STOP_RAMP_S], ramp)
            running[start + STOP_RAMP_S:end] = 0
            running[end:end + STOP_RAMP_S] = np.minimum(running[end:end + STOP_RAMP_S], ramp[::-1])
            busy[max(start - 1800, 0):end + 1800] = True
    return running


def _gauge_png(load: float, fog: float, rng: np.random.Generator, size: int) -> bytes:
    """The gauge at this load; `fog` in [0, 1] mixes in a fogged picture (1: fully fogged)."""
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    angle = np.pi * (1 - load)
    dx, dy = np.cos(angle), -np.sin(angle)
    along = np.clip(xx * dx + yy * dy, 0, 0.9)
    dist = np.hypot(xx - along * dx, yy - along * dy)
    img = 0.15 + 0.75 * np.exp(-(dist / 0.08) ** 2) + 0.25 * (np.hypot(xx, yy) > 0.95)
    if fog:
        fogged = 0.55 + 0.25 * img + 0.2 * np.exp(-((xx - 0.3) ** 2 + (yy + 0.2) ** 2) / 0.3)
        img = (1 - fog) * img + fog * fogged
    img = np.clip(img + rng.normal(0, 0.04, img.shape), 0, 1)
    buf = io.BytesIO()
    Image.fromarray((img * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


_LOG_NORMAL = {0: ["INFO pump idle cycle ok", "DEBUG heartbeat ok", "INFO standby flow low"],
               1: ["INFO pump cycle complete", "INFO flow nominal", "DEBUG heartbeat ok"],
               2: ["INFO high load cycle complete", "WARN fan speed increased", "INFO flow high"]}
_LOG_ERRORS = ["ERROR seal leak detected", "ERROR bearing fault code 17", "WARN pressure drop unexpected"]
# the shifted fleet's controller writes numbers and ids into its lines (templates with variable fields)
_LOG_SHIFTED = {0: ["INFO unit {id} idle for {n} s", "DEBUG hb seq={n} ok", "INFO standby valve={v} closed"],
                1: ["INFO unit {id} cycle {n} done in {ms} ms", "INFO flow {f} l/min nominal", "DEBUG hb seq={n} ok"],
                2: ["INFO unit {id} cycle {n} done in {ms} ms", "WARN fan rpm {n} above 3000", "INFO flow {f} l/min high"]}
_LOG_NOVEL = ["CRIT actuator {id} stalled torque={f}Nm", "ALERT coolant loop {v} pressure oscillation {f} bar",
              "FATAL controller watchdog reset after {ms} ms"]


def _fill(template: str, rng: np.random.Generator) -> str:
    return template.format(id=f"u{rng.integers(100, 999)}", n=int(rng.integers(1, 99_999)), ms=int(rng.integers(5, 900)),
                           v="ABCD"[rng.integers(4)], f=f"{rng.uniform(1, 99):.1f}")


def _timestamps(base_us: int, seconds: np.ndarray, jitter_s: float, rng: np.random.Generator) -> np.ndarray:
    return base_us + (seconds * _S + rng.uniform(-jitter_s, jitter_s, seconds.shape) * _S).astype(np.int64)


def _entity_tables(e: int, cfg: SyntheticConfig, rng: np.random.Generator):
    seconds = cfg.days * 86400
    m = _SHIFTED_MACHINE if cfg.shifted else _DEMO_MACHINE
    base_us = int(dt.datetime(cfg.start.year, cfg.start.month, cfg.start.day,
                              tzinfo=dt.timezone.utc).timestamp() * _S)
    load = _load_curve(rng, seconds, phase=rng.uniform(0, 2 * np.pi), cycle_minutes=m.cycle_minutes)
    events = _draw_events(rng, cfg, seconds)
    running = _draw_stops(e, cfg, events, seconds) if cfg.stops else np.ones(seconds)
    load = load * running               # a stopped pump: no load, its shaft still (below)
    shifted = np.where(load < 0.5, load + m.cross_shift, load - m.cross_shift)
    cross = _mask(events, "cross_modal", seconds)
    process_load = np.where(cross, shifted, load)
    base_temp = m.temp_base[0] + m.temp_base[1] * rng.random()
    base_pressure = m.pressure_base[0] + m.pressure_base[1] * rng.random()
    name = f"pump-{e:02d}"

    # process: one row per minute, jittered, 2 % missing
    minute_s = np.arange(30, seconds, 60)
    minute_s = minute_s[rng.random(minute_s.size) > 0.02]
    temp_curve = base_temp + m.temp_gain * _ema(process_load[::10], tau=m.temp_tau)[minute_s // 10]
    temperature = temp_curve + rng.normal(0, 0.4, minute_s.size) + 30 * _mask(events, "overheat", seconds)[minute_s]
    temperature += 6 * _ramp(events, "slow_drift", seconds)[minute_s]
    pressure = base_pressure + m.pressure_gain * process_load[minute_s] + rng.normal(0, 0.1, minute_s.size)
    process = {"ts": _timestamps(base_us, minute_s, 15, rng), "temperature": temperature, "pressure": pressure}

    # vibration: 1 Hz with outages (the shifted fleet: also one sensor failure of 2-4 h on a scored day)
    keep = np.ones(seconds, bool)
    for _ in range(2 * cfg.days):
        start = int(rng.integers(0, seconds - 900))
        keep[start:start + int(rng.integers(120, 600))] = False
    if cfg.shifted and cfg.days > cfg.clean_days:
        start = int(rng.integers(cfg.clean_days * 86400, seconds - 4 * 3600))
        keep[start:start + int(rng.integers(2 * 3600, 4 * 3600))] = False
    vib_s = np.flatnonzero(keep)
    amp = (m.vib_amp[0] + m.vib_amp[1] * load[vib_s]) * running[vib_s]
    rough = _mask(events, "vibration", seconds)
    if "intermittent" in cfg.kinds:     # intermittent: rough in bursts of 20-90 s, smooth in between
        bursts = np.zeros(seconds, bool)
        for start, end, kind in events:
            if kind == "intermittent":
                t = start
                while t < end:
                    on = int(rng.integers(20, 91))
                    bursts[t:min(t + on, end)] = True
                    t += on + int(rng.integers(20, 91))
        rough = rough | bursts
    rough = rough[vib_s]
    phase = 2 * np.pi * vib_s / m.shaft_period_s
    noise = np.where(rough, 0.45, 0.05)
    vibration = {"ts": _timestamps(base_us, vib_s, 0.2, rng),
                 "ax": amp * np.sin(phase) + rough * 0.6 * np.sin(3 * phase) + rng.normal(0, 1, vib_s.size) * noise,
                 "ay": amp * np.cos(phase) + rng.normal(0, 1, vib_s.size) * noise,
                 "az": 0.5 * amp * (np.sin(2 * phase) if cfg.ac_vibration else 1.0)
                       + rng.normal(0, 1, vib_s.size) * noise}

    if cfg.dead_channels:
        _silence_channels(e, cfg, events, {"vibration": (vibration, vib_s), "process": (process, minute_s)})

    if cfg.outages and not cfg.shifted and cfg.days > cfg.clean_days:
        # the same failure for a design fleet, drawn from a stream of its own and cut out of the rows afterwards:
        # the flag changes nothing else
        draw = np.random.default_rng([cfg.seed, e, 7])
        start = int(draw.integers(cfg.clean_days * 86400, seconds - 4 * 3600))
        failed = (vib_s >= start) & (vib_s < start + int(draw.integers(2 * 3600, 4 * 3600)))
        vibration = {k: v[~failed] for k, v in vibration.items()}

    # camera: every 5 minutes, 5 % missing
    cam_s = np.arange(150, seconds, 300)
    cam_s = cam_s[rng.random(cam_s.size) > 0.05]
    fog = np.maximum(_mask(events, "camera", seconds), _ramp(events, "camera_fade", seconds))[cam_s]
    camera = {"ts": _timestamps(base_us, cam_s, 30, rng),
              "frame": [_gauge_png(process_load[s], f, rng, cfg.image_size) for s, f in zip(cam_s, fog)]}

    # logs: Poisson per minute, rate and words follow load (a stopped pump: a heartbeat a minute or so)
    rate = (m.log_rate[0] + m.log_rate[1] * load[30::60]) * np.maximum(running[30::60], 0.5)
    counts = rng.poisson(rate)
    log_s = np.repeat(np.arange(counts.size) * 60, counts) + rng.integers(0, 60, counts.sum())
    level = np.digitize(load[log_s], [0.35, 0.7])
    if cfg.shifted:
        messages = [_fill(_LOG_SHIFTED[lv][rng.integers(3)], rng) for lv in level]
    else:
        messages = [_LOG_NORMAL[lv][rng.integers(3)] for lv in level]
    if cfg.stops:                       # the controller says when it stops and starts the pump
        moves = np.flatnonzero(np.diff((running > 0.5).astype(int)))
        log_s = np.concatenate([log_s, moves])
        messages += ["INFO pump stopped" if running[s + 1] < 0.5 else "INFO pump started" for s in moves]
    err_mask = _mask(events, "log_errors", seconds)
    err_s = np.flatnonzero(err_mask[::30]) * 30
    log_s = np.concatenate([log_s, err_s])
    messages += [_LOG_ERRORS[rng.integers(3)] for _ in err_s]
    if cfg.shifted:                     # novel templates, about one line every 40 s during the event
        novel_s = np.flatnonzero(_mask(events, "novel_logs", seconds)[::40]) * 40
        log_s = np.concatenate([log_s, novel_s])
        messages += [_fill(_LOG_NOVEL[rng.integers(3)], rng) for _ in novel_s]
    order = np.argsort(log_s, kind="stable")
    logs = {"ts": _timestamps(base_us, log_s[order], 0.5, rng), "message": [messages[i] for i in order]}

    tables = {"process": process, "vibration": vibration, "camera": camera, "logs": logs}
    if cfg.audio:
        mic_s = np.arange(200, seconds, 300)
        t = np.arange(cfg.audio_rate) / cfg.audio_rate
        pitch = _squeal_pitch(e, cfg, events, seconds)
        waves = [(0.2 + 0.5 * load[s]) * np.sin(2 * np.pi * (80 + 220 * load[s]) * t)
                 + SQUEAL_LEVEL * np.sin(2 * np.pi * pitch[s] * t) + rng.normal(0, 0.02, t.size) for s in mic_s]
        tables["mic"] = {"ts": _timestamps(base_us, mic_s, 10, rng),
                         "wave": [w.astype(np.float32).tolist() for w in waves]}
    labels = [(name, base_us + s * _S, base_us + end * _S, kind) for s, end, kind in events]
    return name, tables, labels


def generate(cfg: SyntheticConfig = SyntheticConfig()) -> SyntheticData:
    """Generate the fleet: one Arrow table per modality (with a `date` column) and the labels table."""
    rng = np.random.default_rng(cfg.seed)
    columns: dict[str, dict[str, list]] = {}
    labels: list[tuple] = []
    for e in range(cfg.entities):
        name, tables, ent_labels = _entity_tables(e, cfg, rng)
        labels += ent_labels
        for mod, cols in tables.items():
            dest = columns.setdefault(mod, {"machine_id": []})
            dest["machine_id"].append(np.full(len(cols["ts"]), name, dtype=object))
            for key, values in cols.items():
                dest.setdefault(key, []).append(values)
    out = {}
    for mod, cols in columns.items():
        arrays = {"machine_id": pa.array(np.concatenate(cols.pop("machine_id")), pa.string())}
        for key, parts in cols.items():
            if key == "ts":
                arrays[key] = pa.array(np.concatenate(parts), pa.int64()).cast(pa.timestamp("us", tz="UTC"))
            elif isinstance(parts[0], list):
                flat = [v for p in parts for v in p]
                arrays[key] = pa.array(flat, pa.binary() if key == "frame" else
                                       pa.list_(pa.float32()) if key == "wave" else pa.string())
            else:
                arrays[key] = pa.array(np.concatenate(parts).astype(np.float64), from_pandas=True)   # NaN: null
        table = pa.table(arrays)
        out[mod] = table.append_column("date", _dates(table["ts"]))
    label_table = pa.table({
        "machine_id": pa.array([lab[0] for lab in labels], pa.string()),
        "start_ts": pa.array([lab[1] for lab in labels], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        "end_ts": pa.array([lab[2] for lab in labels], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        "kind": pa.array([lab[3] for lab in labels], pa.string()),
    })
    return SyntheticData(tables=out, labels=label_table, config=cfg)


def _dates(ts: pa.ChunkedArray) -> pa.Array:
    micros = np.asarray(ts.cast(pa.int64()).to_numpy())
    days = (micros // DAY_US).astype("datetime64[D]")
    return pa.array(np.datetime_as_string(days, unit="D"), pa.string())


def synthetic_spec(root: str, cfg: SyntheticConfig, *, train_days: int | None = None) -> dict:
    """The spec (as plain data) describing data written under `root` by `generate`."""
    train_days = cfg.clean_days if train_days is None else train_days
    end = cfg.start + dt.timedelta(days=train_days - 1)
    modalities = {
        "process": {"kind": "tabular", "path": f"{root}/raw/process", "columns": ["temperature", "pressure"],
                    "tolerance": "2min", "context": {"window": "1h"}},
        "vibration": {"kind": "timeseries", "path": f"{root}/raw/vibration", "columns": ["ax", "ay", "az"],
                      "period": "2s", "window": "1min"},
        "camera": {"kind": "image", "path": f"{root}/raw/camera", "column": "frame",
                   "size": [cfg.image_size, cfg.image_size], "tolerance": "6min", "encoding_distance": 0.5},
        "logs": {"kind": "text", "path": f"{root}/raw/logs", "column": "message", "window": "5min"},
    }
    if cfg.audio:
        modalities["mic"] = {"kind": "audio", "path": f"{root}/raw/mic", "column": "wave",
                             "sample_rate": cfg.audio_rate, "tolerance": "6min", "clip": "1s"}
    return {
        "name": "synthetic-pumps-shifted" if cfg.shifted else "synthetic-pumps", "entity": "machine_id", "time": "ts", "grain": "1min", "partition": "date",
        "modalities": modalities,
        "labels": {"path": f"{root}/labels", "start": "start_ts", "end": "end_ts"},
        "model": {"fusion": "attention", "detector": "autoencoder", "contribution_scale": "tail"},
        "train": {"start": cfg.start.isoformat(), "end": end.isoformat(), "epochs": 8, "workers": 2,
                  "gpu": False, "validation_days": 1},
        "registry": f"{root}/models",
        "score": {"output": f"{root}/scores", "threshold": {"method": "pot", "risk": 3e-3},
                  "smoothing": {"method": "ewma", "alpha": 0.5, "knee": 4}},
    }
