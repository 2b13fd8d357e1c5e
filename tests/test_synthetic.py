"""The synthetic fleets: the demo fleet stays as it was, the shifted (evaluation-only) fleet has its own
machines and anomaly shapes."""
import datetime as dt
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from dmafn.synthetic import ANOMALY_KINDS, SHIFTED_KINDS, SyntheticConfig, generate

DAY_S = 86_400


@pytest.fixture(scope="module")
def shifted():
    return generate(SyntheticConfig(entities=2, days=3, clean_days=2, anomalies_per_day=10, image_size=16,
                                    shifted=True, seed=1))


def _seconds(ts) -> np.ndarray:
    return ts.cast("int64").to_numpy() / 1e6 - dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc).timestamp()


def test_each_fleet_labels_its_own_kinds_after_the_clean_days(shifted):
    demo = generate(SyntheticConfig(entities=1, days=2, clean_days=1, anomalies_per_day=5, image_size=16))
    assert set(demo.labels["kind"].to_pylist()) == set(ANOMALY_KINDS)
    assert set(shifted.labels["kind"].to_pylist()) == set(SHIFTED_KINDS)
    assert _seconds(shifted.labels["start_ts"]).min() >= 2 * DAY_S             # the clean days stay clean
    drifts = shifted.labels.filter(pc.equal(shifted.labels["kind"], "slow_drift"))
    minutes = (_seconds(drifts["end_ts"]) - _seconds(drifts["start_ts"])) / 60
    assert minutes.min() >= 45 and minutes.max() <= 90                          # slow: tens of minutes


def test_the_slow_drift_fleet_is_the_demos_fleet_with_slow_drifts_as_a_sixth_kind():
    """`slow_drifts`: the demo's machines and kinds plus slow_drift (six a day), each 45-90 minutes long."""
    from dmafn.synthetic import synthetic_spec

    cfg = SyntheticConfig(entities=2, days=2, clean_days=1, image_size=16, seed=4, anomalies_per_day=6,
                          slow_drifts=True)
    data = generate(cfg)
    kinds = data.labels["kind"].to_pylist()
    assert set(kinds) == {*ANOMALY_KINDS, "slow_drift"} and len(kinds) == 2 * 6
    drifts = data.labels.filter(pc.equal(data.labels["kind"], "slow_drift"))
    minutes = (_seconds(drifts["end_ts"]) - _seconds(drifts["start_ts"])) / 60
    assert minutes.min() >= 45 and minutes.max() <= 90
    assert synthetic_spec("/x", cfg)["name"] == "synthetic-pumps"            # the demo's machines, not the shifted


def test_the_gradual_fleet_is_the_demos_fleet_with_the_three_gradual_kinds():
    """`gradual`: the demo's machines and kinds plus slow_drift, intermittent and camera_fade (eight a day);
    intermittent vibration is rough in bursts with smooth stretches between, inside its events only."""
    from dmafn.synthetic import GRADUAL_KINDS, synthetic_spec

    cfg = SyntheticConfig(entities=2, days=2, clean_days=1, image_size=16, seed=4, gradual=True)  # one of each kind
    data = generate(cfg)
    kinds = data.labels["kind"].to_pylist()
    assert set(kinds) == {*ANOMALY_KINDS, *GRADUAL_KINDS} and len(kinds) == 2 * 8
    assert synthetic_spec("/x", cfg)["name"] == "synthetic-pumps"
    vib, labels = data.tables["vibration"], data.labels
    t, who, az = _seconds(vib["ts"]), np.array(vib["machine_id"].to_pylist()), np.asarray(vib["az"])
    for e in labels.filter(pc.equal(labels["kind"], "intermittent")).to_pylist():
        start = (e["start_ts"] - dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)).total_seconds()
        end = (e["end_ts"] - dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)).total_seconds()
        inside = az[(who == e["machine_id"]) & (t >= start) & (t <= end)]
        before = az[(who == e["machine_id"]) & (t >= start - 3600) & (t < start - 600)]
        rough = [chunk.std() > 0.2 for chunk in np.array_split(inside, len(inside) // 10)]   # 10 s: sd 0.45 or 0.05
        assert 0.2 < np.mean(rough) < 0.8                 # bursts with smooth stretches between
        assert np.mean([chunk.std() > 0.2 for chunk in np.array_split(before, len(before) // 10)]) < 0.05


def test_an_audio_fleet_gets_a_squeal_that_only_the_microphone_hears():
    """`audio`: a sixth kind, squeal - the clips inside its events carry a tone in `SQUEAL_HZ` over the hum, the clips
    outside none; the other modalities' kinds and the fleet without audio are as before."""
    from dmafn.synthetic import AUDIO_KINDS, SQUEAL_HZ

    cfg = SyntheticConfig(entities=2, days=2, clean_days=1, image_size=16, seed=4, audio=True)   # one of each kind
    data = generate(cfg)
    kinds = data.labels["kind"].to_pylist()
    assert set(kinds) == {*ANOMALY_KINDS, *AUDIO_KINDS} and len(kinds) == 2 * 6
    assert set(replace(cfg, audio=False).kinds) == set(ANOMALY_KINDS)
    mic, labels = data.tables["mic"], data.labels
    t, who = _seconds(mic["ts"]), np.array(mic["machine_id"].to_pylist())
    waves = np.array(mic["wave"].to_pylist())                                    # (clips, 4000): 1 s at 4 kHz
    spectrum = np.abs(np.fft.rfft(waves, axis=1))                                # 1 Hz per bin
    high = spectrum[:, int(SQUEAL_HZ[0]) - 5:int(SQUEAL_HZ[1]) + 5].max(1)      # the hum stays under 300 Hz
    inside = np.zeros(len(t), bool)
    for e in labels.filter(pc.equal(labels["kind"], "squeal")).to_pylist():
        start = (e["start_ts"] - dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)).total_seconds()
        end = (e["end_ts"] - dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)).total_seconds()
        inside |= (who == e["machine_id"]) & (t >= start + 15) & (t <= end - 15)   # clips jitter by 10 s
    assert inside.sum() >= 6
    assert high[inside].min() > 300 and np.median(high[~inside]) < 30            # 0.22 x 2000 against noise


def test_novel_log_templates_occur_only_inside_their_events(shifted):
    logs, labels = shifted.tables["logs"], shifted.labels
    novel = np.array([m.split()[0] in ("CRIT", "ALERT", "FATAL") for m in logs["message"].to_pylist()])
    assert novel.any()
    t, who = _seconds(logs["ts"]), np.array(logs["machine_id"].to_pylist())
    events = labels.filter(pc.equal(labels["kind"], "novel_logs")).to_pylist()
    inside = np.zeros(len(t), bool)
    for e in events:
        start = (e["start_ts"] - dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)).total_seconds()
        end = (e["end_ts"] - dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)).total_seconds()
        inside |= (who == e["machine_id"]) & (t >= start - 1) & (t <= end + 1)
    assert not (novel & ~inside).any()
    normal = [m for m, n in zip(logs["message"].to_pylist(), novel) if not n]
    assert any(any(c.isdigit() for c in m) for m in normal)                      # lines carry numbers and ids


def _longest_vibration_gaps(data) -> list[tuple[float, float]]:
    """(length s, start s) of each pump's longest gap between vibration rows."""
    vib, out = data.tables["vibration"], []
    for pump in sorted(set(vib["machine_id"].to_pylist())):
        t = np.sort(_seconds(vib.filter(pc.equal(vib["machine_id"], pump))["ts"]))
        gaps = np.diff(t)
        out.append((float(gaps.max()), float(t[int(np.argmax(gaps))])))
    return out


def test_the_vibration_sensor_fails_for_hours_on_a_scored_day_unlabelled(shifted):
    for length, start in _longest_vibration_gaps(shifted):
        assert length >= 2 * 3600 - 5 and start >= 2 * DAY_S - 5
    assert "outage" not in set(shifted.labels["kind"].to_pylist())


def test_outages_give_a_design_fleet_the_same_failure_and_nothing_else():
    """`outages`: the demo's family gets the shifted fleet's 2-4 h vibration failure on a scored day; without
    it no gap is that long; the labels and the other tables are untouched by the flag's draws."""
    base = SyntheticConfig(entities=2, days=2, clean_days=1, image_size=16, seed=3, gradual=True)
    plain, failing = generate(base), generate(replace(base, outages=True))
    assert all(length < 3600 for length, _ in _longest_vibration_gaps(plain))
    for length, start in _longest_vibration_gaps(failing):
        assert 2 * 3600 - 5 <= length <= 4 * 3600 + 5 and start >= DAY_S - 5
    assert failing.labels.equals(plain.labels)
    assert failing.tables["process"].equals(plain.tables["process"])


def test_ac_vibration_makes_every_axis_swing_about_zero_and_changes_nothing_else():
    """`ac_vibration`: the third axis oscillates instead of carrying half the amplitude as a steady part, so every
    axis averages near zero over a minute whatever the load, and its swing grows with the load; every other
    value, row and label is as without the flag."""
    base = SyntheticConfig(entities=1, days=1, clean_days=1, image_size=16, seed=2)
    plain, swinging = generate(base), generate(replace(base, ac_vibration=True))
    a, b = plain.tables["vibration"], swinging.tables["vibration"]
    assert a.drop(["az"]).equals(b.drop(["az"])) and plain.labels.equals(swinging.labels)
    assert plain.tables["process"].equals(swinging.tables["process"])
    steady, swing = a["az"].to_numpy(), b["az"].to_numpy()
    minutes = len(swing) // 60
    means = swing[:minutes * 60].reshape(minutes, 60).mean(1)
    assert abs(steady.mean()) > 0.2 and np.abs(means).max() < 0.1 * steady.mean()
    load_proxy = steady[:minutes * 60].reshape(minutes, 60).mean(1)                   # the steady part: 0.5 x amplitude
    spread = swing[:minutes * 60].reshape(minutes, 60).std(1)
    assert np.corrcoef(load_proxy, spread)[0, 1] > 0.9


def test_a_slow_drift_moves_temperature_up_to_six_degrees_inside_its_range(shifted):
    proc, labels = shifted.tables["process"], shifted.labels
    drift = labels.filter(pc.equal(labels["kind"], "slow_drift")).to_pylist()[0]
    rows = proc.filter(pc.equal(proc["machine_id"], drift["machine_id"]))
    t, temp = _seconds(rows["ts"]), rows["temperature"].to_numpy()
    base = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    start, end = (drift["start_ts"] - base).total_seconds(), (drift["end_ts"] - base).total_seconds()
    assert start < end
    clean = temp[t < 2 * DAY_S]
    assert temp[(t >= start) & (t <= end)].max() < clean.max() + 6           # never far out of the normal range


def test_ramps_rise_from_nothing_to_full_over_their_events():
    from dmafn.synthetic import _ramp

    ramp = _ramp([(2, 6, "slow_drift"), (8, 9, "camera_fade")], "slow_drift", 12)
    assert ramp.tolist() == [0, 0, 0, 0.25, 0.5, 0.75, 1, 0, 0, 0, 0, 0]


def test_dead_channels_null_one_channel_for_hours_around_a_fault_and_change_nothing_else():
    """`dead_channels`: vibration `ay` and process `pressure` are null for 2-4 h on the first scored day, each around
    the day's first fault of its modality (vibration, overheat), the rows kept; every other value, row and label is
    as without the flag."""
    base = SyntheticConfig(entities=2, days=2, clean_days=1, image_size=16, seed=3)
    plain, dead = generate(base), generate(replace(base, dead_channels=True))
    assert dead.labels.equals(plain.labels)
    for table, column, kind in (("vibration", "ay", "vibration"), ("process", "pressure", "overheat")):
        a, b = plain.tables[table], dead.tables[table]
        assert a.drop([column]).equals(b.drop([column])) and a[column].null_count == 0
        for entity in ("pump-00", "pump-01"):
            rows = b.filter(pc.equal(b["machine_id"], entity))
            gone = rows.filter(rows[column].is_null())["ts"].cast(pa.int64()).to_numpy()
            span = (gone.max() - gone.min()) / 1e6
            assert 2 * 3600 - 120 <= span <= 4 * 3600 + 120
            assert gone.min() >= DAY_S * 1e6 + plain.tables[table]["ts"].cast(pa.int64()).to_numpy().min() - 120e6
            labels = dead.labels.filter(pc.and_(pc.equal(dead.labels["machine_id"], entity),
                                                pc.equal(dead.labels["kind"], kind)))
            first = min(zip(*[labels[c].cast(pa.int64()).to_pylist() for c in ("start_ts", "end_ts")]))
            assert gone.min() <= first[0] and first[1] <= gone.max()     # the fault inside the dead hours
            kept = rows.filter(rows[column].is_valid())
            assert kept.num_rows + len(gone) == rows.num_rows


def test_stops_still_each_pump_for_a_while_a_day_away_from_faults_and_say_so_in_the_logs():
    """`stops`: 2-4 stops a day per pump (training days too) of 20-120 minutes, none within 30 minutes of a labelled
    event, each announced by the controller's log lines; while stopped the shaft is still (vibration noise only) and
    the pressure rests at its base."""
    stops = generate(SyntheticConfig(entities=2, days=2, clean_days=1, image_size=16, seed=3, stops=True))
    logs, vib, proc = stops.tables["logs"], stops.tables["vibration"], stops.tables["process"]
    for entity in ("pump-00", "pump-01"):
        mine = logs.filter(pc.equal(logs["machine_id"], entity))
        said = mine.filter(pc.match_substring_regex(mine["message"], "^INFO pump (stopped|started)$"))
        words = said["message"].to_pylist()
        times = said["ts"].cast(pa.int64()).to_numpy() / 1e6
        assert 2 <= len(words) // 2 <= 8 and words == ["INFO pump stopped", "INFO pump started"] * (len(words) // 2)
        labels = stops.labels.filter(pc.equal(stops.labels["machine_id"], entity))
        events = list(zip(*[(labels[c].cast(pa.int64()).to_numpy() / 1e6) for c in ("start_ts", "end_ts")]))
        v = vib.filter(pc.equal(vib["machine_id"], entity))
        p = proc.filter(pc.equal(proc["machine_id"], entity))
        vt, pt = v["ts"].cast(pa.int64()).to_numpy() / 1e6, p["ts"].cast(pa.int64()).to_numpy() / 1e6
        pressure, running = p["pressure"].to_numpy(), np.ones(len(pt), bool)
        for stop, start in zip(times[::2], times[1::2]):
            assert 20 * 60 - 130 <= start - stop <= 120 * 60 + 130
            assert all(stop - 1800 + 130 > end or start + 1800 - 130 < begin for begin, end in events)
            still = (vt > stop + 120) & (vt < start - 120)
            assert still.any() and np.abs(v["ax"].to_numpy()[still]).max() < 0.4   # a running shaft swings 0.2-1.2
            running &= ~((pt > stop - 60) & (pt < start + 180))
            rest = (pt > stop + 120) & (pt < start - 120)
            assert pressure[rest].mean() < pressure[running].min() + 0.5
