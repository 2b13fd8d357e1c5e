"""Featurisation, statistics, row checks and schema checks - pure functions, without Ray."""
import io
import re

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from PIL import Image

from dmafn.detector import Detector
from tests.conftest import same_statistics
from dmafn.features import (StatisticsFitter, _fixed_lists, decode_image, featurize, hash_token, tokenize_messages,
                            transform_window)
from dmafn.model import small
from pipelines.align import TIME, align, date_start_us, make_ticks
from pipelines.ingest import REASON, check_rows, check_schema
from pipelines.storage import DataError
from tests.modeldata import make, specs

T0 = date_start_us(__import__("datetime").date(2024, 1, 2))
M = 60_000_000


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 20), value, np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def aligned_rows(spec, entities=("a", "b")):
    ticks = make_ticks(pl.DataFrame({"machine_id": list(entities)}), __import__("datetime").date(2024, 1, 2),
                       spec.grain_us).group_by("machine_id").head(3)
    rows = lambda ts, **c: pl.DataFrame({"machine_id": [e for e in entities for _ in ts],  # noqa: E731
                                         TIME: [t for _ in entities for t in ts],
                                         **{k: [v for i in range(len(entities)) for v in vals(i)]
                                            for k, vals in c.items()}})
    tables = {
        "proc": rows([T0, T0 + M], temp=lambda i: [10.0 + 100 * i, 12.0 + 100 * i]),
        "vib": rows([T0 - 20_000_000, T0], a=lambda i: [1.0, 2.0]),
        "logs": rows([T0], msg=lambda i: ["ERROR pump 7 failed"]),
        "cam": pl.DataFrame({"machine_id": [entities[0]], TIME: [T0], "frame": [png(200)]}),
    }
    return align(ticks, tables, spec).to_arrow()


def test_tokenizer_hashes_stably_and_keeps_latest_tokens():
    a = tokenize_messages(["INFO pump ok", "ERROR seal 17"], max_tokens=5)
    assert a.shape == (5,) and (a > 0).all()
    assert (tokenize_messages(["error SEAL 17"], 4) == a[-4:]).all()     # case-folded, same ids
    assert tokenize_messages(None, 4).tolist() == [0, 0, 0, 0]
    # read from the newest message back: the same ids as every message's tokens and separators in order, cut to the
    # latest, whether the window's messages hold fewer or many more tokens than kept, and messages repeated
    rng = np.random.default_rng(0)
    words = ["pump", "ok", "ERROR", "seal", "17", "x9", "valve", "3"]
    for _ in range(200):
        msgs = [" ".join(rng.choice(words, rng.integers(0, 6))) for _ in range(rng.integers(0, 12))]
        msgs += msgs[:rng.integers(0, 3)]
        every = [i for m in msgs for i in [*(hash_token(t) for t in re.findall(r"[a-z]+|\d+", m.lower())), 1]]
        for keep in (1, 5, 64):
            expected = [0] * max(keep - len(every), 0) + every[-keep:]
            assert tokenize_messages(msgs, keep).tolist() == expected


def test_a_log_line_is_read_from_its_first_characters_for_its_tokens_and_template():
    """A line longer than `MESSAGE_CHARS` (a dump logged whole) gives its tokens, template and novelty from its first
    characters: what lies past them is not read (a megabyte line in every window took minutes a day)."""
    from dmafn.features import MESSAGE_CHARS, TextVocabulary, line_template, message_text

    head = "seal pressure ok " * (MESSAGE_CHARS // 17 + 1)
    long_line = head[:MESSAGE_CHARS] + " omega 42" * 100_000
    assert message_text(long_line) == head[:MESSAGE_CHARS] and message_text("pump 7 ok") == "pump 7 ok"
    assert (tokenize_messages([long_line]) == tokenize_messages([head[:MESSAGE_CHARS]])).all()
    assert "omega" not in line_template(long_line) and line_template(long_line) == line_template(head[:MESSAGE_CHARS])
    vocab = TextVocabulary.fit(TextVocabulary.count([head[:MESSAGE_CHARS]]))
    assert vocab.novelty([long_line]) == (0, 0)


def test_a_16_bit_grey_frame_decodes_as_its_8_bit_twin(tiny_spec):
    """Machine-vision cameras write 16-bit grey PNGs: scaled to 8 bits they give the 8-bit frame's pixels, where
    Pillow's own conversion would clip every value over 255 (a white frame)."""
    from dataclasses import replace

    from dmafn.features import decode_pixels

    deep = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    frames = []
    for pixels in (deep, (deep / 257).round().astype(np.uint8)):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        frames.append(buf.getvalue())
    assert Image.open(io.BytesIO(frames[0])).mode == "I;16"
    for channels in (1, 3):
        cam = replace(tiny_spec.modalities["cam"], channels=channels)
        wide, narrow = (decode_pixels(f, cam) for f in frames)
        assert wide.shape == (channels, 16, 16) and np.array_equal(wide, narrow) and 0 < wide.mean() < 200


def test_frames_in_each_format_a_camera_writes_decode_to_the_same_pixels(tiny_spec):
    """TIFF (8- and 16-bit grey, as machine-vision cameras write it), BMP, GIF and lossless WebP frames of one image
    decode to the PNG's pixels; each passes ingest's check of the bytes' start, a WAV file in a RIFF container
    does not decode."""
    from pipelines.ingest import IMAGE_MAGIC
    from dmafn.features import decode_pixels

    grey = np.linspace(0, 255, 16 * 16).reshape(16, 16).round().astype(np.uint8)
    cam = tiny_spec.modalities["cam"]

    def saved(image, fmt, **options):
        buf = io.BytesIO()
        image.save(buf, format=fmt, **options)
        return buf.getvalue()

    png_pixels = decode_pixels(saved(Image.fromarray(grey), "PNG"), cam)
    frames = [saved(Image.fromarray(grey), "TIFF"), saved(Image.fromarray(grey.astype(np.uint16) * 257), "TIFF"),
              saved(Image.fromarray(grey), "BMP"), saved(Image.fromarray(grey), "GIF"),
              saved(Image.fromarray(grey).convert("RGB"), "WEBP", lossless=True)]
    for frame in frames:
        assert frame.startswith(IMAGE_MAGIC) and np.array_equal(decode_pixels(frame, cam), png_pixels)
    wave = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(28)
    assert wave.startswith(IMAGE_MAGIC) and decode_pixels(wave, cam) is None
    rows = pa.table({"machine_id": ["a"] * 7, "ts": pa.array(range(7), pa.timestamp("us", tz="UTC")),
                     "frame": [*frames, wave, b"%PDF-1.7"]})
    assert check_rows(rows, tiny_spec, cam).column(REASON).to_pylist() == [None] * 6 + [
        "unusable value in column 'frame'"]


def test_decode_image_resizes_and_rejects_garbage(tiny_spec):
    cam = tiny_spec.modalities["cam"]
    img = decode_image(png(255), cam)
    assert img.shape == (1, 16, 16) and img.max() == pytest.approx(1.0)
    assert decode_image(b"not an image", cam) is None


def test_fixed_lists_right_align_pad_truncate_and_zero_nulls():
    lists = [[1.0, 2.0], None, [1.0, 2.0, 3.0, 4.0, 5.0], [], [7.0, None, 9.0]]
    column = pa.chunked_array([pa.array(lists[:2], pa.list_(pa.float32())),
                               pa.array(lists, pa.list_(pa.float32())).slice(2)])    # chunks, one sliced
    expected = [[0, 0, 1, 2], [0, 0, 0, 0], [2, 3, 4, 5], [0, 0, 0, 0], [0, 7, 0, 9]]
    assert _fixed_lists(column, 4).tolist() == expected
    assert _fixed_lists(pa.chunked_array([], pa.list_(pa.float32())), 4).shape == (0, 4)


def test_featurize_decodes_a_repeated_frame_once_and_keeps_bad_bytes_absent(tiny_spec, monkeypatch):
    import dmafn.features as features

    aligned = aligned_rows(tiny_spec)
    stats = StatisticsFitter(tiny_spec).add(aligned).result()
    frames = aligned.column("cam__frame").to_pylist()
    present = aligned.column("cam__present").to_pylist()
    first = present.index(True)
    garbage = [b"not an image" if i == first else f for i, f in enumerate(frames)]
    calls = []
    real = features.decode_pixels
    monkeypatch.setattr(features, "decode_pixels", lambda data, m: calls.append(data) or real(data, m))
    feats = featurize(aligned.set_column(aligned.schema.get_field_index("cam__frame"), "cam__frame",
                                         pa.array(garbage, pa.binary())), tiny_spec, stats)
    assert sum(present) == 3 and len(calls) == 2        # the garbage and the frame the two other ticks share
    assert not feats.mask[first, 3] and feats.mask[:, 3].sum() == sum(present) - 1
    taken = aligned.column("cam__taken").to_pylist()      # the row each frame came from; -1 where none is usable
    assert feats.taken["cam"].tolist() == [t if p and i != first else -1 for i, (t, p) in enumerate(zip(taken, present))]
    assert set(feats.taken) == {"proc", "cam"} and len(feats.groups) == aligned.num_rows   # as-of payloads only


def test_featurize_shapes_masks_and_global_statistics(tiny_spec):
    aligned = aligned_rows(tiny_spec)
    stats = StatisticsFitter(tiny_spec).add(aligned).result()
    feats = featurize(aligned, tiny_spec, stats)
    n = aligned.num_rows
    assert feats.inputs["proc"].shape == (n, 1)
    assert feats.inputs["vib"].shape == (n, 3, 1)
    assert feats.inputs["cam"].shape == (n, 1, 16, 16)
    assert feats.inputs["logs"].shape[0] == n and feats.inputs["logs"].dtype == np.int64
    assert feats.mask.shape == (n, 4)
    present_proc = feats.mask[:, 0]
    assert abs(feats.inputs["proc"][present_proc].mean()) < 1e-5      # normalised with training statistics
    assert (feats.inputs["cam"][~feats.mask[:, 3]] == 0).all()          # absent -> zeros


@pytest.mark.parametrize("glitch", [1e20, 1e300, -1e300])
def test_a_reading_far_beyond_the_training_range_gives_bounded_inputs_and_a_finite_extreme_score(tiny_spec, glitch):
    """A finite glitch of any size is held at Z_LIMIT standard deviations: squared in float32 it would give inf,
    then NaN through the network, a NaN score and no alarm; held, it scores finite and above every normal row."""
    import torch

    from dmafn.features import Z_LIMIT
    from dmafn.model import build_model, small
    from dmafn.scoring import raw_scores

    aligned = aligned_rows(tiny_spec)
    stats = StatisticsFitter(tiny_spec).add(aligned).result()
    temp = aligned.column("proc__temp").to_numpy(zero_copy_only=False).copy()
    row = int(np.flatnonzero(np.isfinite(temp))[0])
    temp[row] = glitch
    glitched = aligned.set_column(aligned.schema.get_field_index("proc__temp"), "proc__temp", pa.array(temp))
    feats = featurize(glitched, tiny_spec, stats)
    assert np.isfinite(feats.inputs["proc"]).all() and np.abs(feats.inputs["proc"]).max() <= Z_LIMIT
    assert feats.inputs["proc"][row, 0] == np.sign(glitch) * Z_LIMIT
    torch.manual_seed(0)
    model = build_model(tiny_spec.modalities, small(d_model=8, latent=4, fusion="attention"))
    errors = raw_scores(model, feats).errors
    proc = feats.modalities.index("proc")
    assert np.isfinite(errors[feats.mask]).all()
    assert errors[row, proc] == np.nanmax(errors[:, proc]) > 1e6 * np.nanmedian(errors[:, proc])


def test_a_training_glitch_that_holds_a_channels_variance_is_reported_by_modality_and_column():
    """One value of 1e20 among 1,200 training rows sets the channel's std: `outlier_warnings` names the modality,
    the column and the value once (not again for the context view whose windows hold it), also when the fitter's
    shards merge; clean rows give no line."""
    spec = _relation_spec()
    rng = np.random.default_rng(0)
    rows = _relation_rows(spec, 1200, rng, {"a": 0.0, "b": 5.0})
    assert StatisticsFitter(spec).add(rows).outlier_warnings() == []
    pres = rows.column("proc__pres").to_numpy().copy()
    pres[700] = 1e20
    glitched = rows.set_column(rows.schema.get_field_index("proc__pres"), "proc__pres", pa.array(pres))
    history = np.array(glitched.column("proc_context__pres").to_pylist(), np.float32)
    history[700:760, -1] = 1e20                          # the same reading in the context windows that hold it
    glitched = glitched.set_column(glitched.schema.get_field_index("proc_context__pres"), "proc_context__pres",
                                   pa.array(history.tolist(), pa.list_(pa.float32())))
    merged = StatisticsFitter(spec).add(glitched.slice(0, 600)).merge(StatisticsFitter(spec).add(glitched.slice(600)))
    (line,) = merged.outlier_warnings()
    assert line.startswith("modality 'proc', column 'pres': one training value (1e+20) holds 100% of")
    assert merged.result()["modalities"]["proc"]["global"]["std"][1] > 1e17      # what it did to the statistics


def test_a_channel_float32_holds_only_in_coarse_steps_is_reported_by_modality_and_column():
    """A pressure near 1.2e7 that moves by ~1: float32, in which alignment and the model hold values, keeps it only
    in steps of 1, so `outlier_warnings` names the modality and column once (not for its context view), also
    when the fitter's shards merge; near 1.2e3 the same spread gives no line, nor does a constant channel."""
    spec = _relation_spec()
    rows = _relation_rows(spec, 200, np.random.default_rng(0), {"a": 0.0, "b": 5.0})
    assert StatisticsFitter(spec).add(rows).outlier_warnings() == []

    def moved(offset):
        pres = rows.column("proc__pres").to_numpy() + offset
        return rows.set_column(rows.schema.get_field_index("proc__pres"), "proc__pres", pa.array(pres))

    far = moved(1.2e7)
    merged = StatisticsFitter(spec).add(far.slice(0, 100)).merge(StatisticsFitter(spec).add(far.slice(100)))
    (line,) = merged.outlier_warnings()
    assert line.startswith("modality 'proc', column 'pres': values up to 1.2e+07 that move by ")
    assert "keeps them only in steps of 1;" in line
    assert StatisticsFitter(spec).add(moved(1.2e3)).outlier_warnings() == []
    constant = rows.set_column(rows.schema.get_field_index("proc__pres"), "proc__pres", pa.array([1.2e7] * 200))
    assert StatisticsFitter(spec).add(constant).outlier_warnings() == []


def test_a_tabular_level_far_from_zero_keeps_its_steps_up_to_the_model():
    """A row's values are taken in float64 until they are standardised: a counter near 1.2e7 that moves by ~0.3
    gives the model the inputs the same rows give near zero (in float32 it was held in steps of 1: inputs off by
    up to 1.7 std), and training warns of nothing - the warning stays for what alignment holds in float32 windows
    (a series, or a tabular channel's context: the test above)."""
    from dmafn.spec import parse_spec
    from tests.conftest import tiny_spec_dict

    data = tiny_spec_dict()
    data["modalities"] = {"proc": data["modalities"]["proc"]}
    spec = parse_spec(data)
    temp = np.random.default_rng(0).normal(0, 0.3, 400)

    def rows(offset):
        return pa.table({"machine_id": ["a", "b"] * 200, "proc__present": [True] * 400, "proc__temp": temp + offset})

    near, far = (StatisticsFitter(spec).add(rows(offset)) for offset in (0.0, 1.2e7))
    assert far.outlier_warnings() == []
    inputs = [featurize(rows(offset), spec, fitter.result()).inputs["proc"] for offset, fitter in ((0.0, near), (1.2e7, far))]
    assert inputs[1].dtype == np.float32
    np.testing.assert_allclose(inputs[1], inputs[0], atol=1e-5)
    assert len(np.unique(inputs[1])) == 400


def test_a_relation_residual_is_held_within_z_limit():
    from dmafn.features import Z_LIMIT

    spec = _relation_spec()
    rng = np.random.default_rng(0)
    stats = StatisticsFitter(spec).add(_relation_rows(spec, 300, rng, {"a": 0.0})).result()
    rows = _relation_rows(spec, 5, rng, {"a": 0.0})
    temp = rows.column("proc__temp").to_numpy().copy()
    temp[0] = 1e300
    feats = featurize(rows.set_column(rows.schema.get_field_index("proc__temp"), "proc__temp", pa.array(temp)),
                      spec, stats)
    errors = feats.relation_errors[:, feats.modalities.index("proc")]
    assert np.isfinite(errors).all() and errors[0] == pytest.approx(Z_LIMIT ** 2 / 2, rel=1e-3)   # 2 channels


def test_entity_normalisation_with_global_fallback(tiny_spec):
    from dataclasses import replace

    spec = replace(tiny_spec, model=replace(tiny_spec.model, normalization="entity"))
    aligned = aligned_rows(spec)
    stats = StatisticsFitter(spec).add(aligned).result()
    assert set(stats["modalities"]["proc"]["entity"]) == {"a", "b"}
    feats = featurize(aligned, spec, stats)
    proc = feats.inputs["proc"][feats.mask[:, 0], 0]
    assert np.abs(proc).max() < 2.0            # each pump around its own operating point
    unseen = featurize(aligned_rows(spec, entities=("zz",)), spec, stats)
    assert np.isfinite(unseen.inputs["proc"]).all()


def test_check_rows_gives_a_reason_per_bad_row(tiny_spec):
    table = pa.table({"machine_id": ["a", None, "a", "a"],
                      "ts": pa.array([1, 2, None, 4], pa.timestamp("us", tz="UTC")),
                      "temp": [1.0, 2.0, 3.0, float("nan")]})
    reasons = check_rows(table, tiny_spec, tiny_spec.modalities["proc"]).column(REASON).to_pylist()
    assert reasons == [None, "null entity column 'machine_id'", "null time column 'ts'",
                       "unusable value in column 'temp'"]


def test_a_row_of_numbers_with_an_unusable_value_in_some_columns_is_kept_for_the_others(tmp_path):
    """A series row whose `a` is NaN or infinite (one dead or glitching channel) keeps its other channels: no reason,
    the bad value null, and the first such column named for the quarantine table, where the row is noted beside the
    rows that could not be used at all; a row with no usable value is quarantined as before (its first column
    named). The shard's usable rows count the rows usable in any column (a dead channel leaves the modality its
    other channels: `align`); one-column and non-numeric modalities are unchanged."""
    import datetime as dt

    import pyarrow.parquet as pq

    from dmafn.spec import parse_spec
    from pipelines.ingest import PARTLY, PARTLY_USED, read_shard, unusable_reasons
    from pipelines.storage import Storage
    from tests.conftest import tiny_spec_dict

    data = tiny_spec_dict()
    data["modalities"] = {"vib": {**data["modalities"]["vib"], "path": str(tmp_path / "vib"), "columns": ["a", "b"]}}
    spec = parse_spec(data)
    vib = spec.modalities["vib"]
    day = 1_704_153_600_000_000                                   # 2024-01-02 00:00 UTC
    rows = pa.table({"machine_id": ["m"] * 4, "ts": pa.array([day + i * 10 * 1_000_000 for i in range(4)],
                                                             pa.timestamp("us", tz="UTC")),
                     "a": [1.0, float("nan"), float("inf"), None], "b": [5.0, 6.0, None, 8.0]})
    checked = check_rows(rows, spec, vib)
    assert checked.column(REASON).to_pylist() == [None, None, "unusable value in column 'a'", None]
    assert checked.column(PARTLY).to_pylist() == [None, f"unusable value in column 'a' ({PARTLY_USED})", None,
                                                  f"unusable value in column 'a' ({PARTLY_USED})"]
    assert checked.column("a").to_pylist()[:2] == [1.0, None] and checked.column("b").to_pylist()[:2] == [5.0, 6.0]

    path = _folder(tmp_path / "vib" / "date=2024-01-02") / "part-0.parquet"
    other = pa.table({"machine_id": ["n"], "ts": pa.array([day + 5_000_000], pa.timestamp("us", tz="UTC")),
                      "a": pa.array([None], pa.float64()), "b": [1.0]})       # another machine's one row without `a`
    pq.write_table(pa.concat_tables([rows, other]), path, row_group_size=2)
    got = read_shard(_shard(tmp_path, spec, [dt.date(2024, 1, 2)]), spec, Storage())
    assert got.tables["vib"].sort("_t").select("a", "b").rows() == [(1.0, 5.0), (None, 1.0), (None, 6.0), (None, 8.0)]
    # the rows kept for their other values: one quarantine row per file, entity and column (counting them, timed at
    # the first) - one row alone noted as itself
    assert got.quarantined.sort("entity", "_t").select("entity", "_t", "reason", "rows").rows() == [
        ("m", day + 10_000_000, f"unusable value in column 'a' ({PARTLY_USED}): 2 rows of file '{path}', "
         "2024-01-02T00:00:10+00:00 to 2024-01-02T00:00:30+00:00", 2),
        ("m", day + 20_000_000, "unusable value in column 'a'", 1),
        ("n", day + 5_000_000, f"unusable value in column 'a' ({PARTLY_USED})", 1)]
    assert unusable_reasons(got.quarantined) == {f"vib: unusable value in column 'a' ({PARTLY_USED})": 3,
                                                 "vib: unusable value in column 'a'": 1}
    assert got.usable_rows == {"2024-01-02": {"vib": 4}} and got.rows_read == {"2024-01-02": 5}   # in any column
    one = parse_spec(tiny_spec_dict())
    assert PARTLY not in check_rows(rows.select(["machine_id", "ts", "a"]).rename_columns(["machine_id", "ts", "temp"]),
                                    one, one.modalities["proc"]).column_names


def _folder(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_check_rows_rejects_audio_clips_that_are_empty_or_hold_a_missing_or_non_finite_sample(tiny_spec):
    from dataclasses import replace

    mic = replace(tiny_spec.modalities["cam"], name="mic", kind="audio", column="wave")
    table = pa.table({"machine_id": ["a"] * 6, "ts": pa.array(range(6), pa.timestamp("us", tz="UTC")),
                      "wave": pa.array([[0.1, -0.2], [0.1, float("nan")], [float("inf"), 1.0], [1.0, None], [], None],
                                       pa.list_(pa.float32()))})
    reasons = check_rows(table, tiny_spec, mic).column(REASON).to_pylist()
    assert reasons == [None] + ["unusable value in column 'wave'"] * 5


def _wav(samples: np.ndarray, rate: int, bits: int, channels: int = 1, code: int = 1, extensible: bool = False):
    """A WAV file of `samples` (floats in [-1, 1], repeated on each channel) written by hand: PCM (`code` 1) of
    `bits`, or IEEE float (3); in a WAVE_FORMAT_EXTENSIBLE header when asked."""
    x = np.repeat(samples, channels)
    data = (x.astype("<f4").tobytes() if code == 3 else (x * 127 + 128).round().astype(np.uint8).tobytes() if bits == 8
            else b"".join(int(v).to_bytes(3, "little", signed=True) for v in (x * (2 ** 23 - 1)).round())
            if bits == 24 else (x * (2 ** (bits - 1) - 1)).round().astype(f"<i{bits // 8}").tobytes())
    block = channels * bits // 8
    fmt = ((0xFFFE if extensible else code).to_bytes(2, "little") + channels.to_bytes(2, "little")
           + rate.to_bytes(4, "little") + (rate * block).to_bytes(4, "little") + block.to_bytes(2, "little")
           + bits.to_bytes(2, "little"))
    if extensible:
        fmt += (22).to_bytes(2, "little") + bits.to_bytes(2, "little") + bytes(4) + code.to_bytes(2, "little") + bytes(14)
    chunks = b"fmt " + len(fmt).to_bytes(4, "little") + fmt + b"LIST" + (3).to_bytes(4, "little") + b"abc\x00" \
        + b"data" + len(data).to_bytes(4, "little") + data
    return b"RIFF" + (4 + len(chunks)).to_bytes(4, "little") + b"WAVE" + chunks


def test_audio_stored_as_wav_bytes_decodes_to_the_clips_samples_at_the_modalitys_rate(tiny_spec):
    """Microphones' clips stored as WAV files: PCM of 8-32 bits or float, mono or stereo (averaged), in a plain or
    an extensible header, past other chunks (an odd-sized one padded); another sample rate resampled to the
    modality's; bytes that are no WAV are quarantined with their reason."""
    from dataclasses import replace

    from dmafn.features import decode_wav
    from pipelines.ingest import check_schema, decoded_audio

    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(1600) / 16_000)
    for bits, code, channels, extensible, error in ((8, 1, 1, False, 8e-3), (16, 1, 2, False, 4e-5),
                                                    (24, 1, 1, True, 2e-7), (32, 1, 1, False, 2e-8),
                                                    (32, 3, 2, True, 1e-7)):
        clip = decode_wav(_wav(tone, 16_000, bits, channels, code, extensible), 16_000)
        assert clip.dtype == np.float32 and clip.shape == tone.shape and np.abs(clip - tone).max() < error
    faster = 0.5 * np.sin(2 * np.pi * 440 * np.arange(4410) / 44_100)        # 0.1 s at 44.1 kHz
    resampled = decode_wav(_wav(faster, 44_100, 16), 16_000)
    assert resampled.shape == (1600,) and np.abs(resampled - tone).max() < 2e-3
    for broken in (b"RIFF\x04\x00\x00\x00WAVE", _wav(tone, 16_000, 12), b"\x89PNG", b"", None):
        assert decode_wav(broken, 16_000) is None

    mic = replace(tiny_spec.modalities["cam"], name="mic", kind="audio", column="wave", sample_rate=16_000)
    table = pa.table({"machine_id": ["a"] * 3, "ts": pa.array(range(3), pa.timestamp("us", tz="UTC")),
                      "wave": [_wav(tone, 16_000, 16), b"not a wav", None]})
    check_schema(table.schema, tiny_spec, mic, "/d")
    read, unread = decoded_audio(table, mic)
    assert read["wave"].type == pa.list_(pa.float32()) and len(read["wave"][0]) == 1600
    reasons = check_rows(read.append_column(unread.name, unread.to_arrow()), tiny_spec, mic).column(REASON)
    assert reasons.to_pylist() == [None, "undecodable audio in column 'wave'", "unusable value in column 'wave'"]


def test_check_rows_rejects_non_image_bytes(tiny_spec):
    table = pa.table({"machine_id": ["a", "a"], "ts": pa.array([1, 2], pa.timestamp("us", tz="UTC")),
                      "frame": [png(3), b"hello"]})
    reasons = check_rows(table, tiny_spec, tiny_spec.modalities["cam"]).column(REASON).to_pylist()
    assert reasons == [None, "unusable value in column 'frame'"]


def test_check_schema_names_the_missing_or_mistyped_column(tiny_spec):
    from dataclasses import replace

    schema = pa.schema([("machine_id", pa.string()), ("ts", pa.timestamp("us"))])
    with pytest.raises(DataError, match=r"modality 'proc' \(/data/proc\): column 'temp' not found"):
        check_schema(schema, tiny_spec, tiny_spec.modalities["proc"], "/data/proc")
    schema = schema.append(pa.field("temp", pa.date32()))
    with pytest.raises(DataError, match=r"column 'temp' is date32\[day\], expected a number \(or its text, or "
                                        r"true/false\)"):
        check_schema(schema, tiny_spec, tiny_spec.modalities["proc"], "/data/proc")
    categorical = pa.schema([("machine_id", pa.string()), ("ts", pa.timestamp("us")),
                             ("temp", pa.dictionary(pa.int32(), pa.binary()))])
    with pytest.raises(DataError, match="column 'temp' is dictionary<values=binary, .*expected a number"):
        check_schema(categorical, tiny_spec, tiny_spec.modalities["proc"], "/data/proc")
    for stored in (pa.dictionary(pa.int8(), pa.float32()), pa.null(),    # a categorical of numbers; no value;
                   pa.string(), pa.dictionary(pa.int32(), pa.string()),   # numbers as text (a CSV's strings);
                   pa.bool_()):                                           # a state (a valve open or shut)
        check_schema(categorical.set(2, pa.field("temp", stored)), tiny_spec, tiny_spec.modalities["proc"], "/d")
    for stored in (pa.binary(), pa.large_binary(), pa.dictionary(pa.int32(), pa.binary())):   # text as bytes
        check_schema(pa.schema([("machine_id", pa.string()), ("ts", pa.timestamp("us")), ("msg", stored)]),
                     tiny_spec, tiny_spec.modalities["logs"], "/d")
    with pytest.raises(DataError, match="column 'msg' is int64, expected a string \\(or UTF-8 bytes\\)$"):
        check_schema(pa.schema([("machine_id", pa.string()), ("ts", pa.timestamp("us")), ("msg", pa.int64())]),
                     tiny_spec, tiny_spec.modalities["logs"], "/d")
    # a list per row where one value is read: a waveform block points to the audio kind, a text's lines to a join
    for stored in (pa.list_(pa.float32()), pa.large_list(pa.int16()), pa.list_(pa.float64(), 4)):
        with pytest.raises(DataError, match=r"column 'a' is .*, expected a number .* a row holding a block of samples "
                                            r"\(a waveform\) is read as a clip by `kind: audio`"):
            check_schema(pa.schema([("machine_id", pa.string()), ("ts", pa.timestamp("us")), ("a", stored)]),
                         tiny_spec, tiny_spec.modalities["vib"], "/d")
    with pytest.raises(DataError, match=r"column 'msg' is list<item: string>, expected a string \(or UTF-8 bytes\) - "
                                        r"a list of strings \(lines, tokens\) per row: join it"):
        check_schema(pa.schema([("machine_id", pa.string()), ("ts", pa.timestamp("us")),
                                ("msg", pa.list_(pa.string()))]), tiny_spec, tiny_spec.modalities["logs"], "/d")
    with pytest.raises(DataError, match=r"column 'temp' is list<item: string>, expected a number \(or its text, "
                                        r"or true/false\)$"):       # a list of text where a number is read: no hint
        check_schema(categorical.set(2, pa.field("temp", pa.list_(pa.string()))), tiny_spec,
                     tiny_spec.modalities["proc"], "/d")
    bad_time = pa.schema([("machine_id", pa.string()), ("ts", pa.bool_()), ("temp", pa.float64())])
    with pytest.raises(DataError, match="time column 'ts' is bool, expected a timestamp or ISO 8601 text$"):
        check_schema(bad_time, tiny_spec, tiny_spec.modalities["proc"], "/data/proc")
    for stored in (pa.string(), pa.large_string(), pa.dictionary(pa.int32(), pa.string()), pa.null()):  # read_times
        check_schema(bad_time.set(1, pa.field("ts", stored)), tiny_spec, tiny_spec.modalities["proc"], "/d")
    epoch = bad_time.set(1, pa.field("ts", pa.int64()))           # epoch milliseconds, as a Kafka sink writes them
    for stored in (pa.int64(), pa.float64()):
        with pytest.raises(DataError, match=f"time column 'ts' is {stored}, expected a timestamp or ISO 8601 text; a "
                                            "count of seconds, .* \\(an integer or a float\\) is read as such with "
                                            "time_unit: s, ms, us or ns$"):
            check_schema(epoch.set(1, pa.field("ts", stored)), tiny_spec, tiny_spec.modalities["proc"], "/data/proc")
    in_ms = replace(tiny_spec, time_unit="ms")
    for stored in (pa.int64(), pa.int32(), pa.uint64(), pa.timestamp("ns"), pa.float64(), pa.float32()):
        check_schema(epoch.set(1, pa.field("ts", stored)), in_ms, in_ms.modalities["proc"], "/d")
    own_unit = replace(tiny_spec, modalities={"proc": replace(tiny_spec.modalities["proc"], time_unit="s")})
    check_schema(epoch.set(1, pa.field("ts", pa.float64())), own_unit, own_unit.modalities["proc"], "/d")
    with pytest.raises(DataError, match="time column 'ts' is bool, expected a timestamp, ISO 8601 text or a count of "
                                        "ms since the epoch \\(time_unit\\)"):
        check_schema(epoch.set(1, pa.field("ts", pa.bool_())), in_ms, in_ms.modalities["proc"], "/d")


def test_integer_times_read_as_the_spec_time_unit_and_a_count_no_timestamp_holds_is_quarantined(tiny_spec):
    """`time_unit`: an integer time column counts that unit since the epoch (UTC); a count beyond what a timestamp
    in microseconds can hold (a nanosecond column declared as seconds) is a row quarantined with its count named,
    a null one a null time; a timestamp column is left as it is."""
    import datetime as dt
    from dataclasses import replace

    from pipelines.ingest import read_times

    second = 1_704_153_600                                        # 2024-01-02 00:00 UTC
    table = pa.table({"machine_id": ["a"] * 4, "ts": pa.array([second * 1000, second * 1000 + 1500, None, 2 ** 62]),
                      "temp": [1.0, 2.0, 3.0, 4.0]})
    spec = replace(tiny_spec, time_unit="ms")
    read, bad = read_times(table, "ts", "ms")
    assert read["ts"].type == pa.timestamp("us")
    assert read["ts"].to_pylist()[:3] == [dt.datetime(2024, 1, 2), dt.datetime(2024, 1, 2, 0, 0, 1, 500_000), None]
    assert bad[:3].null_count() == 3
    reasons = check_rows(read.append_column("_unread_time", bad.to_arrow()), spec, spec.modalities["proc"])
    assert reasons.column(REASON).to_pylist() == [
        None, None, "null time column 'ts'",
        f"time column 'ts' holds {2 ** 62}, which as ms since the epoch no timestamp can hold"]
    for unit, count in (("s", second), ("us", second * 10 ** 6), ("ns", second * 10 ** 9 + 999)):
        times, none = read_times(table.set_column(1, "ts", pa.array([count] * 4)), "ts", unit)
        assert times["ts"].to_pylist() == [dt.datetime(2024, 1, 2)] * 4 and none.null_count() == 4
    unsigned = pa.array([second, 2 ** 64 - 1], pa.uint64())       # beyond int64: out of range, not wrapped
    assert read_times(pa.table({"ts": unsigned}), "ts", "s")[1].to_list() == [
        None, f"time column 'ts' holds {2 ** 64 - 1}, which as s since the epoch no timestamp can hold"]
    stamped = table.set_column(1, "ts", pa.array([0] * 4, pa.timestamp("ms")))
    assert read_times(stamped, "ts", "ms") == (stamped, None)
    # floats: epoch seconds with a fraction (a log shipper's), to the nearest microsecond; NaN and beyond: unread
    shipped = pa.array([second + 0.25, second + 1.0000004, None, float("nan"), float("inf"), 1e300])
    times, none = read_times(pa.table({"ts": shipped}), "ts", "s")
    assert times["ts"].to_pylist() == [dt.datetime(2024, 1, 2, 0, 0, 0, 250_000), dt.datetime(2024, 1, 2, 0, 0, 1),
                                       None, None, None, None]
    assert none.to_list() == [None, None, None] + [
        f"time column 'ts' holds {v}, which as s since the epoch no timestamp can hold" for v in ("NaN", "inf", "1e+300")]
    as_ms = read_times(pa.table({"ts": pa.array([second * 1000.0 + 0.5], pa.float32())}), "ts", "ms")[0]
    assert abs(as_ms["ts"][0].as_py() - dt.datetime(2024, 1, 2)) < dt.timedelta(minutes=3)   # float32: ~2 min steps


def test_times_stored_as_text_read_as_iso_8601_each_by_its_own_shape(tiny_spec):
    """A time column stored as text (a CSV loaded without parsing dates): ISO 8601 with or without a zone, to the
    minute or the nanosecond, a date alone; a day-first or impossible date, or no time at all, is a row quarantined
    with its text named (never a date guessed from another row's format); with `time_unit`, digits count it."""
    import datetime as dt

    from pipelines.ingest import read_times
    from pipelines.stored_times import times_from_text

    texts = ["2024-01-02T10:00:00Z", " 2024-01-02 10:00:01.5 ", "2024-01-02T11:00+01:00", "2024-01-02T04:30:00-0530",
             "2024-01-02", "2024-01-02T10:00:00.123456789+00", "05/01/2024 10:00", "2024-02-30T00:00", "24:00", None]
    table = pa.table({"machine_id": ["a"] * 10, "ts": texts, "temp": [1.0] * 10})
    read, bad = read_times(table, "ts", None)
    at = lambda *clock: dt.datetime(2024, 1, 2, *clock)          # noqa: E731
    assert read["ts"].to_pylist() == [at(10), at(10, 0, 1, 500_000), at(10), at(10), at(0), at(10, 0, 0, 123_456),
                                      None, None, None, None]
    reasons = check_rows(read.append_column("_unread_time", bad.to_arrow()), tiny_spec, tiny_spec.modalities["proc"])
    assert reasons.column(REASON).to_pylist()[5:] == [
        None, "time column 'ts' holds '05/01/2024 10:00', not an ISO 8601 time",
        "time column 'ts' holds '2024-02-30T00:00', not an ISO 8601 time",
        "time column 'ts' holds '24:00', not an ISO 8601 time", "null time column 'ts'"]
    categorical = table.set_column(1, "ts", pa.array(texts).dictionary_encode())
    assert read_times(categorical, "ts", None)[0]["ts"].equals(read["ts"])
    times, unread = times_from_text(pl.Series(["1704189600000", "2024-01-02T10:00Z", "noon"]), "ms")
    assert times.to_list() == [at(10), at(10), None] and unread.to_list() == [None, None, "noon"]
    assert times_from_text(pl.Series(["1704189600000"]))[1].to_list() == ["1704189600000"]     # no unit: no count


def test_times_written_in_a_time_format_are_read_by_it_and_others_quarantined_with_the_format_named(tiny_spec,
                                                                                                   tmp_path):
    """`time_format`: day-first text with a fraction read by the format (spaces ignored); an offset in the format
    converts each value by its own; without one the wall clock of `naive_times: local`'s zone; a text of another
    shape - ISO 8601 too - or an impossible date is a row quarantined with the format named. A modality's own
    format reads its files through `read_shard`, and the labels read the spec's."""
    import datetime as dt
    from dataclasses import replace

    import pyarrow.parquet as pq

    from dmafn.spec import LabelsSpec
    from pipelines.ingest import read_shard, read_times
    from pipelines.labels import load_labels
    from pipelines.storage import Storage
    from dmafn.spec import parse_spec
    from pipelines.stored_times import times_from_format
    from tests.conftest import tiny_spec_dict

    texts = ["02/01/2024 10:00:00.5", " 02/01/2024 23:59:59 ", "2024-01-02T10:00:00Z", "31/02/2024 10:00:00", None]
    table = pa.table({"machine_id": ["a"] * 5, "ts": texts, "temp": [1.0] * 5})
    read, bad = read_times(table, "ts", None, None, "%d/%m/%Y %H:%M:%S%.f")
    assert read["ts"].to_pylist() == [dt.datetime(2024, 1, 2, 10, 0, 0, 500_000), dt.datetime(2024, 1, 2, 23, 59, 59),
                                      None, None, None]
    reasons = check_rows(read.append_column("_unread_time", bad.to_arrow()), tiny_spec, tiny_spec.modalities["proc"])
    assert reasons.column(REASON).to_pylist()[2:] == [
        "time column 'ts' holds '2024-01-02T10:00:00Z', not a time in the format '%d/%m/%Y %H:%M:%S%.f' (time_format)",
        "time column 'ts' holds '31/02/2024 10:00:00', not a time in the format '%d/%m/%Y %H:%M:%S%.f' (time_format)",
        "null time column 'ts'"]
    zoned, _ = times_from_format(pl.Series(["02/01/2024 11:00 +0100", "02/01/2024 04:30 -0530"]), "%d/%m/%Y %H:%M %z")
    assert zoned.to_list() == [dt.datetime(2024, 1, 2, 10, 0), dt.datetime(2024, 1, 2, 10, 0)]
    local, unread = times_from_format(pl.Series(["Jan 02 2024 11:00:00 AM", "Mar 31 2024 02:30:00 AM"]),
                                      "%b %d %Y %I:%M:%S %p", "Europe/Berlin")
    assert local.to_list() == [dt.datetime(2024, 1, 2, 10, 0), None] and unread.to_list() == [None,
                                                                                             "Mar 31 2024 02:30:00 AM"]
    # several formats, tried in order (a writer that changed its format): each value by the first that reads it
    read, bad = read_times(table, "ts", None, None, ("%d/%m/%Y %H:%M:%S%.f", "ISO8601"))
    assert read["ts"].to_pylist()[:3] == [dt.datetime(2024, 1, 2, 10, 0, 0, 500_000),
                                          dt.datetime(2024, 1, 2, 23, 59, 59), dt.datetime(2024, 1, 2, 10, 0)]
    reasons = check_rows(read.append_column("_unread_time", bad.to_arrow()), tiny_spec, tiny_spec.modalities["proc"])
    assert reasons.column(REASON).to_pylist()[2:4] == [None, "time column 'ts' holds '31/02/2024 10:00:00', not a "
                                                       "time in the formats '%d/%m/%Y %H:%M:%S%.f' or ISO 8601 "
                                                       "(time_format)"]
    first, _ = times_from_format(pl.Series(["05/01/2024 10:00"]), ("%d/%m/%Y %H:%M", "%m/%d/%Y %H:%M"))
    assert first.to_list() == [dt.datetime(2024, 1, 5, 10, 0)]                 # the first format that reads it
    # a modality's own format, through read_shard
    data = tiny_spec_dict()
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "path": str(tmp_path / "proc"),
                                   "time_format": "%d.%m.%Y %H:%M:%S"}}
    spec = parse_spec(data)
    stamps = [dt.datetime(2024, 1, 2, 0, 0) + dt.timedelta(minutes=7 * i) for i in range(5)]
    pq.write_table(pa.table({"machine_id": ["m"] * 5, "ts": [t.strftime("%d.%m.%Y %H:%M:%S") for t in stamps],
                             "temp": [1.0, 2.0, 3.0, 4.0, 5.0]}),
                   _folder(tmp_path / "proc" / "date=2024-01-02") / "p.parquet")
    got = read_shard(_shard(tmp_path, spec, [dt.date(2024, 1, 2)]), spec, Storage())
    assert got.quarantined.is_empty() and got.tables["proc"]["_t"].to_list() == [
        int(t.replace(tzinfo=dt.timezone.utc).timestamp() * 1e6) for t in stamps]
    # the labels read the spec's format
    (tmp_path / "labels").mkdir()
    pq.write_table(pa.table({"machine_id": ["m", "m"], "start_ts": ["02/01/2024 10:00:00", "2024-01-02T10:00:00"],
                             "end_ts": ["02/01/2024 12:00:00", "02/01/2024 12:00:00"]}),
                   tmp_path / "labels" / "part-0.parquet")
    labelled = replace(spec, labels=LabelsSpec(path=str(tmp_path / "labels")), time_format="%d/%m/%Y %H:%M:%S")
    labels = load_labels(labelled, Storage())
    assert labels.usable["start_ts"].dt.hour().to_list() == [10] and labels.unusable["reason"].to_list() == [
        "start_ts '2024-01-02T10:00:00' not a time in the format '%d/%m/%Y %H:%M:%S' (time_format)"]


def test_unusable_rows_are_counted_by_modality_and_kind_of_reason_the_values_they_name_together():
    from pipelines.ingest import unusable_reasons

    clock = "a wall-clock time Europe/Berlin's clocks skipped or showed twice (a daylight-saving change)"
    quarantined = pl.DataFrame({"source": ["proc", "proc", "proc", "vib", "proc", "proc", "proc", "cam", "cam",
                                           "vib", "vib", "proc"],
                                "reason": [
        "time column 'ts' holds '05/01/2024', not an ISO 8601 time", "time column 'ts' holds 'noon', not an ISO 8601 "
        "time", "timed outside its date partition 2024-01-02", "unusable value in column 'ax'",
        "time column 'ts' holds -4611686018427387904, which as ms since the epoch no timestamp can hold",
        f"time column 'ts' holds 2024-10-27 02:00:20.789893, {clock}",
        f"time column 'ts' holds 2024-03-31 02:30:00, {clock}",
        "image file 's3://b/a/1.png' in column 'frame' cannot be read (AWS Error NO_SUCH_KEY: 's3://b/a/1.png')",
        "image file '/f/a/2.png' in column 'frame' cannot be read ([Errno 2] Failed to open local file '/f/a/2.png')",
        "unreadable Parquet file '/v/date=2024-01-02/a.parquet': Parquet file size is 0 bytes - left out "
        "(unreadable_files: skip)", "unreadable Parquet file '/v/date=2024-01-01/b.parquet' of 2024-01-01 (read "
        "around the date): Parquet magic bytes not found in footer - left out (unreadable_files: skip)",
        "column 'pressure' is not in file '/p/date=2024-01-01/c.parquet' (added to its table since it was written): "
        "5668 row(s) read without it (the row's other columns used)"]}).with_columns(rows=pl.lit(1, pl.Int64))
    dead = pl.DataFrame({"source": ["vib"], "rows": [40], "reason": [  # a file's rows without `ay`, noted as one
        "unusable value in column 'ay' (the row's other columns used): 40 rows of file '/v/date=2024-01-02/a.parquet', "
        "2024-01-02T00:00:00+00:00 to 2024-01-02T00:39:00+00:00"]})
    quarantined = pl.concat([quarantined, dead], how="diagonal")
    assert unusable_reasons(quarantined) == {
        "vib: unusable value in column 'ay' (the row's other columns used)": 40,    # the file's note: its rows
        # the misplaced row counted on its own (input_rows_misplaced)
        "cam: image file in column 'frame' cannot be read": 2,
        "proc: time column 'ts' holds a value, not an ISO 8601 time": 2,
        f"proc: time column 'ts' holds a value, {clock}": 2,
        "proc: time column 'ts' holds a value, which as ms since the epoch no timestamp can hold": 1,
        "proc: column 'pressure' is not in files written before it was added to their table": 1,
        "vib: unreadable Parquet file": 2, "vib: unusable value in column 'ax'": 1}


def test_the_report_counts_the_input_rows_a_quarantine_row_notes_and_one_a_row_of_an_older_table():
    from pipelines.report import quarantine_summary

    noted = pl.DataFrame({"stage": ["ingest", "ingest", "score"], "source": ["vib", "vib", "tick"],
                          "reason": ["unusable value in column 'a' (the row's other columns used): 40 rows of "
                                     "file '/v/a.parquet', 2024-01-02T00:00:00+00:00 to 2024-01-02T00:39:00+00:00",
                                     "unusable value in column 'a' (the row's other columns used)",
                                     "no modality present"], "entity": ["m", "n", "m"],
                          "date": ["2024-01-02"] * 3, "rows": [40, None, 1]})    # None: written before `rows`
    older = noted.drop("rows")
    assert quarantine_summary(noted.lazy()).collect().sort("stage").rows() == [
        ("ingest", "vib", "unusable value in column 'a' (the row's other columns used)", 41, 2, 1),   # one kind
        ("score", "tick", "no modality present", 1, 1, 1)]
    assert quarantine_summary(older.lazy()).collect().sort("stage")["rows"].to_list() == [2, 1]


def test_detector_follows_the_pyod_contract():
    train, _ = make(300, seed=3)
    test, y = make(200, seed=4, anomalies=20, kind="proc")
    det = Detector(specs(), small(d_model=16, latent=4), epochs=3, threshold="quantile", quantile=0.95)
    assert det.fit(train) is det
    assert det.decision_scores_.shape == (300,)
    assert np.isfinite(det.threshold_)
    scores = det.decision_function(test)
    assert set(np.unique(det.predict(test))) <= {0, 1}
    assert (det.predict(test) == (scores > det.threshold_)).all()
    assert scores[y == 1].mean() > scores[y == 0].mean()          # higher = more anomalous
    record = det.score_record(test)
    assert record.contributions.shape == (200, 4)
    assert np.nanargmax(np.nanmean(record.contributions[y == 1], 0)) == 0   # the anomaly is in 'proc'


def test_detector_scores_with_a_modality_absent():
    train, _ = make(400, seed=5)
    test, y = make(300, seed=6, anomalies=40, kind="proc")
    det = Detector(specs(), small(d_model=16, latent=4), epochs=4, threshold="quantile").fit(train)
    full = det.decision_function(test)
    test.mask[:150, 2] = False                       # the camera is missing on half the ticks
    partial = det.decision_function(test)
    assert np.isfinite(partial).all()
    assert np.allclose(full[150:], partial[150:])    # ticks that still have it are unchanged
    from dmafn.metrics import roc_auc
    assert roc_auc(partial, y) > 0.8


def _write(path, table):
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _shards(spec, dates, shard_bytes=10**9):
    from pipelines.shards import list_inputs, plan_shards
    from pipelines.storage import Storage

    return plan_shards(spec, dates, list_inputs(spec, dates, Storage()), shard_bytes=shard_bytes)


def _shard(tmp_path, spec, dates):
    (shard,) = _shards(spec, dates)
    return shard


def _proc_spec(tiny_spec, path):
    from dataclasses import replace

    return replace(tiny_spec, modalities={"proc": replace(tiny_spec.modalities["proc"], path=str(path))})


def test_read_shard_reads_its_dates_and_the_lookback_and_quarantines_bad_rows(tmp_path, tiny_spec):
    import datetime as dt

    import polars as pl

    from pipelines.ingest import read_shard
    from pipelines.storage import Storage

    spec = _proc_spec(tiny_spec, tmp_path)
    day = 1_704_153_600_000_000                                   # 2024-01-02 00:00 UTC
    ts = pa.array([day, day + 60_000_000], pa.timestamp("us", tz="UTC"))
    rows = pa.table({"machine_id": ["a", "b"], "ts": ts, "temp": [1.0, float("nan")], "extra": [1, 2]})
    _write(tmp_path / "date=2024-01-02" / "part-0.parquet", rows)
    _write(tmp_path / "date=2024-01-02" / "part-1.parquet", rows.slice(0, 1))
    _write(tmp_path / "date=2024-01-02" / "_spark_side_file.parquet", rows)      # skipped
    _write(tmp_path / "date=2024-01-03" / "part-0.parquet", rows)                  # not asked for
    late = pa.array([day - 60_000_000, day - 3_600_000_000], pa.timestamp("us", tz="UTC"))   # 23:59 and 23:00
    _write(tmp_path / "date=2024-01-01" / "part-0.parquet", rows.set_column(1, "ts", late))
    shard = _shard(tmp_path, spec, [dt.date(2024, 1, 2)])
    assert sorted(f.date.isoformat() for f in shard.files) == ["2024-01-01", "2024-01-02", "2024-01-02"]
    got = read_shard(shard, spec, Storage())
    proc = got.tables["proc"].sort("_t")
    assert proc.columns == ["machine_id", "_t", "temp"]           # only the wanted columns are read
    # the look-back day gives only the row within the 2 min tolerance of the first tick; its NaN row is
    # its own date's quarantine, not this shard's
    assert proc["_t"].to_list() == [day - 60_000_000, day, day]
    assert got.quarantined.select("entity", "date", "source", "reason").rows() == [
        ("b", "2024-01-02", "proc", "unusable value in column 'temp'")]
    assert got.present.sort("machine_id")["machine_id"].to_list() == ["a"]
    assert got.present["_day"].to_list() == [day // 86_400_000_000]


def test_read_shard_reads_dictionary_encoded_values_and_quarantines_a_column_that_holds_no_value(tmp_path,
                                                                                                   tiny_spec):
    """Files of one modality need not store a value column alike: a categorical (dictionary-encoded) text column
    reads as its strings, text stored as bytes (Parquet BINARY without the UTF8 annotation) as its UTF-8 (a value
    that is not UTF-8 quarantined), and a value or time column of Arrow's null type (a writer that saw no value in
    the file) is every row unusable - quarantined, beside the other files' rows, not a failed date."""
    import datetime as dt
    from dataclasses import replace

    from pipelines.ingest import read_shard
    from pipelines.storage import Storage

    spec = replace(tiny_spec, modalities={
        "proc": replace(tiny_spec.modalities["proc"], path=str(tmp_path / "proc")),
        "logs": replace(tiny_spec.modalities["logs"], path=str(tmp_path / "logs"))})
    day = 1_704_153_600_000_000                                   # 2024-01-02 00:00 UTC
    ts = pa.array([day, day + 60_000_000], pa.timestamp("us", tz="UTC"))
    folder = "date=2024-01-02"
    _write(tmp_path / "proc" / folder / "part-0.parquet",
           pa.table({"machine_id": ["a", "b"], "ts": ts, "temp": [1.0, 2.0]}))
    _write(tmp_path / "proc" / folder / "part-1.parquet",
           pa.table({"machine_id": ["c", "d"], "ts": ts, "temp": pa.nulls(2)}))
    _write(tmp_path / "proc" / folder / "part-2.parquet",                        # numbers as text: parsed
           pa.table({"machine_id": ["f", "g"], "ts": ts, "temp": [" 3.5", "N/A"]}))
    _write(tmp_path / "proc" / folder / "part-3.parquet",                        # no time in the file
           pa.table({"machine_id": ["h"], "ts": pa.nulls(1), "temp": [4.0]}))
    _write(tmp_path / "proc" / folder / "part-4.parquet",                        # a state: 1 or 0
           pa.table({"machine_id": ["i", "j"], "ts": ts, "temp": [True, False]}))
    _write(tmp_path / "logs" / folder / "part-0.parquet", pa.table({
        "machine_id": ["a", "a"], "ts": ts, "msg": pa.array(["pump ok", "valve stuck"]).dictionary_encode()}))
    _write(tmp_path / "logs" / folder / "part-1.parquet", pa.table({"machine_id": ["b"], "ts": ts.slice(0, 1),
                                                                    "msg": ["pump ok"]}))
    _write(tmp_path / "logs" / folder / "part-2.parquet", pa.table({"machine_id": ["e", "e"], "ts": ts,
                                                                    "msg": pa.array([b"valve open", b"\xff\xfe"])}))
    got = read_shard(_shard(tmp_path, spec, [dt.date(2024, 1, 2)]), spec, Storage())
    assert got.tables["logs"].schema["msg"] == pl.String
    assert sorted(got.tables["logs"].select("machine_id", "msg").rows()) == [
        ("a", "pump ok"), ("a", "valve stuck"), ("b", "pump ok"), ("e", "valve open")]
    assert sorted(got.tables["proc"].select("machine_id", "temp").rows()) == [
        ("a", 1.0), ("b", 2.0), ("f", 3.5), ("i", 1.0), ("j", 0.0)]
    assert sorted(got.quarantined.select("entity", "source", "reason").rows()) == [
        ("c", "proc", "unusable value in column 'temp'"), ("d", "proc", "unusable value in column 'temp'"),
        ("e", "logs", "invalid UTF-8 in column 'msg'"), ("g", "proc", "unusable value in column 'temp'"),
        ("h", "proc", "null time column 'ts'")]
    assert got.usable_rows == {"2024-01-02": {"proc": 5, "logs": 4}}
    assert got.rows_read == {"2024-01-02": 14}


def test_read_shard_reads_a_log_file_delivered_twice_once(tmp_path, tiny_spec):
    """A sink that retried wrote one log file twice: the copy's lines (entity, time and text alike a line of an
    earlier file) are quarantined, so windows do not count every line double; the same line twice in one file (a
    burst within one timestamp) is kept."""
    import datetime as dt
    from dataclasses import replace

    from pipelines.ingest import REDELIVERED, read_shard
    from pipelines.storage import Storage

    spec = replace(tiny_spec, modalities={"logs": replace(tiny_spec.modalities["logs"], path=str(tmp_path))})
    day = 1_704_153_600_000_000                                   # 2024-01-02 00:00 UTC
    ts = pa.array([day, day, day + 60_000_000], pa.timestamp("us", tz="UTC"))
    first = pa.table({"machine_id": ["a", "a", "a"], "ts": ts, "msg": ["retry", "retry", "pump ok"]})
    _write(tmp_path / "date=2024-01-02" / "part-0.parquet", first)
    _write(tmp_path / "date=2024-01-02" / "part-0-copy.parquet", first)               # delivered again
    _write(tmp_path / "date=2024-01-02" / "part-1.parquet", pa.table({              # one line new, one the same
        "machine_id": ["a", "b"], "ts": ts.slice(1, 2), "msg": ["retry", "retry"]}))
    got = read_shard(_shard(tmp_path, spec, [dt.date(2024, 1, 2)]), spec, Storage())
    assert sorted(got.tables["logs"].select("machine_id", "_t", "msg").rows()) == [
        ("a", day, "retry"), ("a", day, "retry"), ("a", day + 60_000_000, "pump ok"), ("b", day + 60_000_000, "retry")]
    assert sorted(got.quarantined.select("entity", "_t", "reason").rows()) == [
        ("a", day, REDELIVERED)] * 3 + [("a", day + 60_000_000, REDELIVERED)]
    assert got.tables["logs"].columns == ["machine_id", "_t", "msg"]


@pytest.mark.parametrize("reverse", [False, True])
def test_read_shard_quarantines_rows_of_one_key_with_other_values_whatever_the_files_order(tmp_path, tiny_spec,
                                                                                           reverse):
    """Two rows of one entity at one time with different values: which one a tick reads cannot be told, and
    picking one would follow the files' order; both go to quarantine (once: the slow context view reading the
    same rows drops them too). An exact repeat is kept."""
    import datetime as dt

    from dmafn.spec import parse_spec
    from pipelines.ingest import CONFLICT, read_shard
    from pipelines.storage import Storage
    from tests.conftest import tiny_spec_dict

    data = tiny_spec_dict()
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "path": str(tmp_path), "context": {"window": "1h"}}}
    spec = parse_spec(data)
    day = 1_704_153_600_000_000                                   # 2024-01-02 00:00 UTC
    ts = pa.array([day, day, day + 60_000_000], pa.timestamp("us", tz="UTC"))
    first = pa.table({"machine_id": ["a", "b", "a"], "ts": ts, "temp": [1.0, 5.0, 3.0]})
    second = pa.table({"machine_id": ["a", "b"], "ts": ts.slice(0, 2), "temp": [2.0, 5.0]})   # a: other value
    for name, rows in zip(("part-0", "part-1"), (second, first) if reverse else (first, second)):
        _write(tmp_path / "date=2024-01-02" / f"{name}.parquet", rows)
    got = read_shard(_shard(tmp_path, spec, [dt.date(2024, 1, 2)]), spec, Storage())
    for name in ("proc", "proc_context"):
        assert sorted(got.tables[name].rows()) == [("a", day + 60_000_000, 3.0), ("b", day, 5.0), ("b", day, 5.0)]
    assert sorted(got.quarantined.rows()) == [("a", day, "2024-01-02", "proc", CONFLICT, 1)] * 2


def test_conflicting_rows_by_kind(tiny_spec):
    from dataclasses import replace

    from pipelines.ingest import conflicting

    keys = {"machine_id": ["a", "a", "a", "b", "b"], TIME: [1, 1, 2, 1, 1]}
    frames = pl.DataFrame({**keys, "frame": [png(1), png(2), png(1), png(3), png(3)]})
    assert conflicting(frames, tiny_spec, tiny_spec.modalities["cam"]).tolist() == [True, True, False, False, False]
    mic = replace(tiny_spec.modalities["cam"], kind="audio", column="wave")
    waves = pl.DataFrame({**keys, "wave": [[0.1, 0.2], [0.1, 0.2], [0.3], [0.1], [0.1, 0.0]]})
    assert conflicting(waves, tiny_spec, mic).tolist() == [False, False, False, True, True]
    two = replace(tiny_spec.modalities["proc"], columns=("temp", "pres"))
    readings = pl.DataFrame({**keys, "temp": [1.0, None, 2.0, 1.0, None], "pres": [5.0, 5.0, None, 6.0, 7.0]})
    assert conflicting(readings, tiny_spec, two).tolist() == [False, False, False, True, True]  # a null agrees
    series = pl.DataFrame({**keys, "a": [1.0, 2.0, 3.0, 4.0, 5.0]})     # a period's rows are averaged: no choice
    assert not conflicting(series, tiny_spec, tiny_spec.modalities["vib"]).any()
    assert conflicting(frames.clear(), tiny_spec, tiny_spec.modalities["cam"]).tolist() == []


def test_text_lines_at_one_microsecond_keep_one_order_whatever_the_files_order(tiny_spec):
    from dataclasses import replace

    spec = replace(tiny_spec, modalities={"logs": tiny_spec.modalities["logs"]})
    day = date_start_us(__import__("datetime").date(2024, 1, 2))
    ticks = pl.DataFrame({"machine_id": ["a"], TIME: [day + 60_000_000]})
    lines = pl.DataFrame({"machine_id": ["a"] * 4, TIME: [day + 5, day + 5, day + 5, day + 1],
                          "msg": ["zeta warn", "alpha ok", "mid error", "first"]})
    windows = {tuple(align(ticks, {"logs": lines[list(order)]}, spec)["logs__msg"][0])
               for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2])}
    assert windows == {("first", "alpha ok", "mid error", "zeta warn")}


def test_a_lookback_days_images_are_decoded_only_within_reach(tmp_path, tiny_spec, monkeypatch):
    """The day before a shard's date feeds only its last minutes (the tolerance): the frames before that are
    neither kept nor decoded to check them."""
    import datetime as dt
    import io
    from dataclasses import replace

    from PIL import Image

    import pipelines.ingest as ingest
    from pipelines.storage import Storage

    cam = replace(tiny_spec.modalities["cam"], path=str(tmp_path))           # tolerance 5 min
    spec = replace(tiny_spec, modalities={"cam": cam})
    day = 1_704_153_600_000_000                                   # 2024-01-02 00:00 UTC
    minute = 60_000_000
    before = [day - k * minute for k in (600, 300, 120, 2)]       # 10 h, 5 h, 2 h and 2 min before
    _write(tmp_path / "date=2024-01-01" / "part-0.parquet",
           pa.table({"machine_id": ["a"] * 4, "ts": pa.array(before, pa.timestamp("us", tz="UTC")),
                     "frame": [png(v) for v in (10, 20, 30, 40)]}))              # distinct frames
    _write(tmp_path / "date=2024-01-02" / "part-0.parquet",
           pa.table({"machine_id": ["a"], "ts": pa.array([day + minute], pa.timestamp("us", tz="UTC")),
                     "frame": [png(50)]}))
    decoded = []
    real = ingest.decode_pixels
    monkeypatch.setattr(ingest, "decode_pixels", lambda frame, m: decoded.append(1) or real(frame, m))
    got = ingest.read_shard(_shard(tmp_path, spec, [dt.date(2024, 1, 2)]), spec, Storage())
    assert sorted(got.tables["cam"]["_t"].to_list()) == [day - 2 * minute, day + minute]
    assert len(decoded) == 2                                      # the 2-minutes-before frame and the day's
    assert sorted(int(f[0, 0, 0]) for f in got.decoded["cam"].values()) == [40, 50]   # kept for featurize


def test_featurize_reuses_the_frames_the_ingest_check_decoded(tiny_spec, monkeypatch):
    import dmafn.features as features

    aligned = aligned_rows(tiny_spec)
    stats = StatisticsFitter(tiny_spec).add(aligned).result()
    fresh = featurize(aligned, tiny_spec, stats)
    cache = {"cam": {png(200): features.decode_pixels(png(200), tiny_spec.modalities["cam"])}}
    monkeypatch.setattr(features, "decode_pixels", lambda data, m: pytest.fail("decoded again"))
    again = featurize(aligned, tiny_spec, stats, cache)
    assert np.array_equal(again.inputs["cam"], fresh.inputs["cam"]) and np.array_equal(again.mask, fresh.mask)
    assert fresh.inputs["cam"].max() == np.float32(200) / np.float32(255)


def test_entity_buckets_split_rows_and_keep_every_row_once(tmp_path, tiny_spec):
    import datetime as dt

    import polars as pl

    from pipelines.ingest import read_shard
    from pipelines.storage import Storage

    spec = _proc_spec(tiny_spec, tmp_path)
    day = 1_704_153_600_000_000
    names = [f"pump-{i}" for i in range(40)] + [None]
    rows = pa.table({"machine_id": names, "ts": pa.array([day] * 41, pa.timestamp("us", tz="UTC")),
                     "temp": [1.0] * 41})
    _write(tmp_path / "date=2024-01-02" / "part-0.parquet", rows)
    seen, quarantined = [], 0
    size = (tmp_path / "date=2024-01-02" / "part-0.parquet").stat().st_size
    shards = _shards(spec, [dt.date(2024, 1, 2)], shard_bytes=size // 4 + 1)
    assert [s.bucket for s in shards] == [0, 1, 2, 3] and {s.buckets for s in shards} == {4}
    for shard in shards:
        got = read_shard(shard, spec, Storage())
        assert got.tables["proc"].height < 40 if "proc" in got.tables else True
        seen += got.tables["proc"]["machine_id"].to_list() if "proc" in got.tables else []
        quarantined += got.quarantined.height
    assert sorted(seen) == sorted(n for n in names if n) and quarantined == 1


def test_a_dates_partition_files_change_with_a_file_added_removed_or_rewritten_and_only_then(tiny_spec):
    """`partition_files`: per modality a digest of the date's own files (name, size, modification time) and the count
    of files; the look-back day's files are not the date's, another modality's file changes only its own digest."""
    import datetime as dt

    from pipelines.shards import InputFile, partition_files

    day, before = dt.date(2024, 1, 2), dt.date(2024, 1, 1)
    files = [InputFile("proc", day, "/l/proc/date=2024-01-02/a.parquet", 10, name="a.parquet", mtime_ns=5),
             InputFile("vib", day, "/l/vib/date=2024-01-02/a.parquet", 20, name="a.parquet", mtime_ns=5),
             InputFile("proc", before, "/l/proc/date=2024-01-01/a.parquet", 10, name="a.parquet", mtime_ns=5)]
    listed = partition_files(tiny_spec, files, [day])[day]
    assert listed.files == 2 and sorted(listed.digests) == ["cam", "logs", "proc", "vib"]   # every own table
    assert listed.digests["proc"] != listed.digests["vib"]              # the same name, another size
    assert partition_files(tiny_spec, files[:2], [day])[day] == listed   # the look-back day's file is not its own
    added = files + [InputFile("proc", day, "/l/proc/date=2024-01-02/b.parquet", 1, name="b.parquet", mtime_ns=9)]
    rewritten = [InputFile("proc", day, files[0].path, 10, name="a.parquet", mtime_ns=6), *files[1:]]
    resized = [InputFile("proc", day, files[0].path, 11, name="a.parquet", mtime_ns=5), *files[1:]]
    for other in (added, rewritten, resized, files[1:]):
        now = partition_files(tiny_spec, other, [day])[day]
        assert now.changed(listed.digests) == ["proc"], other
    assert partition_files(tiny_spec, list(reversed(files)), [day])[day].changed(listed.digests) == []
    # a modality only one side knows is not compared; a date without files has a listing too
    assert listed.changed({"proc": listed.digests["proc"], "gone": "x"}) == []
    empty = partition_files(tiny_spec, [], [day])[day]
    assert empty.files == 0 and empty.changed(listed.digests) == ["proc", "vib"]


def test_plan_shards_groups_dates_and_splits_big_ones_into_entity_buckets(tiny_spec):
    import datetime as dt

    from pipelines.shards import InputFile, plan_shards

    spec = tiny_spec
    days = [dt.date(2024, 1, d) for d in range(2, 9)]
    sizes = [10, 10, 10, 50, 10, 10, 10]
    files = [InputFile("proc", d, f"/x/{d}", n) for d, n in zip(days, sizes)]
    files.append(InputFile("proc", dt.date(2024, 1, 1), "/x/lookback", 7))
    plan = plan_shards(spec, days, files, shard_bytes=10**9, days_per_shard=3)
    assert [s.dates for s in plan] == [tuple(days[0:3]), tuple(days[3:6]), tuple(days[6:7])]
    assert [f.path for f in plan[0].files] == ["/x/2024-01-02", "/x/2024-01-03", "/x/2024-01-04", "/x/lookback"]
    # 50 bytes at most 25 per shard: two entity buckets for every date; dates share a shard up to 25 per bucket
    plan = plan_shards(spec, days, files, shard_bytes=25, days_per_shard=7, key_casts=(("machine_id", "text"),))
    assert {s.buckets for s in plan} == {2} and [s.bucket for s in plan[:2]] == [0, 1]
    assert [s.dates for s in plan if s.bucket == 0] == [tuple(days[0:3]), (days[3],), tuple(days[4:7])]
    alone = plan[1].alone()
    assert [s.dates for s in alone] == [(d,) for d in days[0:3]]
    assert {(s.bucket, s.buckets, s.key_casts) for s in alone} == {(1, 2, (("machine_id", "text"),))}
    assert [f.path for f in alone[1].files] == ["/x/2024-01-02", "/x/2024-01-03"]     # its look-back day too
    assert plan_shards(spec, [], files) == []
    # at least 4 shards for 7 dates and one bucket: 2 dates a shard, not 7
    plan = plan_shards(spec, days, files, shard_bytes=10**9, days_per_shard=7, min_shards=4)
    assert [len(s.dates) for s in plan] == [2, 2, 2, 1]


def test_no_data_for_the_dates_asked_names_where_each_tables_date_folders_end(tmp_path, tiny_spec):
    """A window past the lake's end (an upload that stopped, a date asked beyond the history): the error names the
    newest date folder of each table, newest first; a table none of whose folders follow the partition is left out
    of the note."""
    import datetime as dt
    from dataclasses import replace

    from pipelines.shards import newest_data_note, require_data
    from pipelines.storage import Storage

    paths = {m: tmp_path / m for m in tiny_spec.modalities}
    for m, days in (("proc", ["2024-01-02", "2024-01-05"]), ("vib", ["2024-01-05"]), ("cam", ["2024-01-04"])):
        for d in days:
            (paths[m] / f"date={d}").mkdir(parents=True)
    (paths["logs"] / "backup").mkdir(parents=True)
    spec = replace(tiny_spec, modalities={n: replace(m, path=str(paths[n])) for n, m in tiny_spec.modalities.items()})
    note = "; the newest date folder: 2024-01-05 (proc, vib), 2024-01-04 (cam)"
    assert newest_data_note(spec, Storage()) == note
    days = [dt.date(2024, 2, 1), dt.date(2024, 2, 2)]
    with pytest.raises(DataError, match=re.escape(f"no modality of spec 'tiny' has data for 2024-02-01..2024-02-02"
                                                  f"{note}") + "$"):
        require_data(spec, [], days, Storage())


def test_a_file_with_a_bad_schema_or_body_is_named(tmp_path, tiny_spec):
    import datetime as dt

    from pipelines.ingest import read_shard
    from pipelines.storage import Storage

    spec = _proc_spec(tiny_spec, tmp_path)
    bad = tmp_path / "date=2024-01-02" / "part-0.parquet"
    _write(bad, pa.table({"machine_id": ["a"], "ts": pa.array([0], pa.timestamp("us")), "tmp": [1.0]}))
    with pytest.raises(DataError, match=r"part-0\.parquet.*'temp' not found"):
        read_shard(_shard(tmp_path, spec, [dt.date(2024, 1, 2)]), spec, Storage())
    bad.write_bytes(b"PAR1 not parquet")
    with pytest.raises(DataError, match=r"part-0\.parquet: not a readable Parquet file"):
        read_shard(_shard(tmp_path, spec, [dt.date(2024, 1, 2)]), spec, Storage())


def test_group_rows_gives_each_key_its_rows_in_order():
    from dmafn.features import group_rows

    groups = dict(group_rows(["b", "a", "b", "c", "a"]))
    assert {k: v.tolist() for k, v in groups.items()} == {"a": [1, 4], "b": [0, 2], "c": [3]}
    assert group_rows([]) == []


def test_series_transforms_remove_the_level_and_keep_the_shape():
    windows = np.array([[[1.0, 10.0], [2.0, 10.0], [4.0, 13.0]]], np.float32)      # (N=1, L=3, C=2)
    assert transform_window(windows, "level") is windows
    centered = transform_window(windows, "centered")
    assert np.allclose(centered[0, :, 0], [-4 / 3, -1 / 3, 5 / 3]) and np.allclose(centered[0, :, 1], [-1, -1, 2])
    assert np.allclose(transform_window(windows + 50, "centered"), centered)       # a drifted level: same input
    diff = transform_window(windows, "difference")
    assert diff[0, :, 0].tolist() == [0.0, 1.0, 2.0] and diff[0, :, 1].tolist() == [0.0, 0.0, 3.0]
    with pytest.raises(ValueError, match="unknown series transform 'log'"):
        transform_window(windows, "log")


def test_a_dates_row_digest_is_kept_by_a_compaction_and_changed_by_a_value(tmp_path, tiny_spec):
    """`row_digests`: what `read_shard` sums of a date's own rows as stored is what `date_digests` reads from the
    partition afterwards - in one bucket or cut into two, the look-back day's rows not counted. The partition's two
    files compacted into one (rows in another order, the key dictionary-encoded, the strings large, times in
    milliseconds) keep the digest; a value changed, a row dropped or a column's type changed do not."""
    import datetime as dt

    import pyarrow.parquet as pq

    from pipelines.ingest import read_shard
    from pipelines.row_digests import HASH, date_digests, merged, record, recorded_columns, same_rows
    from pipelines.shards import list_partition_files
    from pipelines.storage import Storage

    spec = _proc_spec(tiny_spec, tmp_path)
    day, date = 1_704_153_600_000_000, dt.date(2024, 1, 2)             # 2024-01-02 00:00 UTC
    rows = pa.table({"machine_id": [f"m{i % 3}" for i in range(12)],
                     "ts": pa.array([day - 30 * 60_000_000 + i * 7 * 60_000_000 for i in range(12)],
                                    pa.timestamp("ms", tz="UTC")),
                     "temp": [20.0 + i for i in range(12)]})
    own, before = rows.slice(1), rows.slice(0, 1)                       # 23:30 of the day before: its look-back
    pq.write_table(before, _folder(tmp_path / "date=2024-01-01") / "part-0.parquet")
    folder = _folder(tmp_path / "date=2024-01-02")
    pq.write_table(own.slice(0, 5), folder / "part-0.parquet")
    pq.write_table(own.slice(5), folder / "part-1.parquet")
    whole = read_shard(_shard(tmp_path, spec, [date]), spec, Storage()).row_digests["2024-01-02"]["proc"]
    assert whole.rows == 11
    cut = [read_shard(s, spec, Storage()).row_digests["2024-01-02"]["proc"] for s in _shards(spec, [date], 100)]
    assert len(cut) > 1 and merged([{"proc": d} for d in cut])["proc"] == whole
    columns = {"proc": spec.columns_read(spec.modalities["proc"])}
    assert columns == {"proc": ["machine_id", "ts", "temp"]}

    def now():
        return date_digests(spec, list_partition_files(spec, [date], Storage()), columns)

    recorded = record(spec, {"proc": whole})
    assert recorded_columns(recorded) == columns and now()["proc"] == whole and same_rows(recorded, now(), ["proc"])
    for f in folder.iterdir():                                          # a compaction: one file, another order
        f.unlink()
    shuffled = own.take(list(range(10, -1, -1)))
    compacted = pa.table({"machine_id": shuffled["machine_id"].cast(pa.large_string()).dictionary_encode(),
                          "ts": shuffled["ts"], "temp": shuffled["temp"]})
    pq.write_table(compacted, folder / "compacted.parquet")
    assert same_rows(recorded, now(), ["proc"])
    us = compacted.set_column(1, "ts", compacted["ts"].cast(pa.timestamp("us", tz="UTC")))
    pq.write_table(us, folder / "compacted.parquet")
    assert same_rows(recorded, now(), ["proc"])                          # ms times read as the same microseconds
    for changed in (us.set_column(2, "temp", pa.array([20.0 + i for i in range(10)] + [99.0])), us.slice(1),
                    us.set_column(2, "temp", us["temp"].cast(pa.float32()).cast(pa.float16())),
                    us.drop_columns(["temp"])):
        pq.write_table(changed, folder / "compacted.parquet")
        assert not same_rows(recorded, now(), ["proc"]), changed.schema
    assert not same_rows(None, now(), ["proc"])                          # a run that recorded none: never the same
    assert not same_rows(recorded.replace(HASH, "polars 0.0"), now(), ["proc"])


def test_a_big_row_group_is_read_in_parts_with_the_same_rows(tmp_path, tiny_spec, monkeypatch):
    """`each_row_group` reads a row group whose columns hold more than `PART_BYTES` in parts (a buffered stream) that
    together are the row group - struct fields and list columns too -, and `read_shard` then keeps the same rows, in
    one bucket or two, with the same row digests."""
    import datetime as dt

    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    import pipelines.parquet_files as parquet_files
    from pipelines.ingest import read_shard
    from pipelines.storage import Storage

    n = 3000
    nested = pa.table({"k": [f"m{i % 7}" for i in range(n)], "s": pa.StructArray.from_arrays(
        [pa.array(np.arange(n, dtype=float)), pa.array(np.arange(n))], ["a", "b"]), "w": pa.array([[1.0, 2.0]] * n)})
    pq.write_table(nested, tmp_path / "nested.parquet", row_group_size=n)
    path = str(tmp_path / "nested.parquet")
    parquet = parquet_files.open_parquet(pafs.LocalFileSystem(), path)
    (whole,) = parquet_files.each_row_group(parquet, path, ["k", "s.a", "w"])
    spec = _proc_spec(tiny_spec, tmp_path / "proc")
    day = 1_704_153_600_000_000                                        # 2024-01-02 00:00 UTC
    rows = pa.table({"machine_id": [f"m{i % 5}" for i in range(n)],
                     "ts": pa.array([day + i * 20_000_000 for i in range(n)], pa.timestamp("us", tz="UTC")),
                     "temp": np.arange(n, dtype=float)})
    pq.write_table(rows, _folder(tmp_path / "proc" / "date=2024-01-02") / "p.parquet", row_group_size=n)
    date = dt.date(2024, 1, 2)
    before = [read_shard(s, spec, Storage()) for s in (_shard(tmp_path, spec, [date]), *_shards(spec, [date], 10_000))]
    monkeypatch.setattr(parquet_files, "PART_BYTES", 8_000)
    parts = list(parquet_files.each_row_group(parquet, path, ["k", "s.a", "w"], None, pafs.LocalFileSystem()))
    assert len(parts) > 3 and pa.concat_tables(parts).equals(whole)
    after = [read_shard(s, spec, Storage()) for s in (_shard(tmp_path, spec, [date]), *_shards(spec, [date], 10_000))]
    assert len(after) == len(before) > 2
    for a, b in zip(before, after):
        assert a.tables.keys() == b.tables.keys() and a.row_digests == b.row_digests
        assert all(a.tables[m].equals(b.tables[m]) for m in a.tables)
    assert sum(a.row_digests["2024-01-02"]["proc"].rows for a in after[1:]) == n


def test_a_modality_kept_as_a_delta_table_is_read_as_its_log_says(tmp_path, tiny_spec):
    """A modality table written as a Delta table partitioned by date: after a date was overwritten (the replaced file
    stays in its folder until VACUUM), the listing, `read_shard` and `validate --check-data` take only the files the
    log holds, and check-data says so; a table with column mapping is an error naming it (its files do not name
    its columns)."""
    import datetime as dt

    from deltalake import DeltaTable, write_deltalake

    from pipelines.check_data import check_data
    from pipelines.ingest import read_shard
    from pipelines.parquet_files import list_table_files
    from pipelines.shards import list_partition_files
    from pipelines.storage import DataError, Storage

    table = tmp_path / "proc"
    spec = _proc_spec(tiny_spec, table)
    day = 1_704_153_600_000_000                                        # 2024-01-02 00:00 UTC
    rows = pa.table({"date": ["2024-01-02"] * 4, "machine_id": ["a", "a", "b", "b"],
                     "ts": pa.array([day + i * 60_000_000 for i in range(4)], pa.timestamp("us", tz="UTC")),
                     "temp": [1.0, 2.0, 3.0, 4.0]})
    write_deltalake(str(table), rows, partition_by=["date"])
    write_deltalake(str(table), rows.slice(0, 2), partition_by=["date"], mode="overwrite",
                    predicate="date = '2024-01-02'")                  # b's rows deleted; the old file stays
    date = dt.date(2024, 1, 2)
    assert len(list((table / "date=2024-01-02").glob("*.parquet"))) == 2
    (listed,) = list_partition_files(spec, [date], Storage())
    assert DeltaTable(str(table)).file_uris() == [listed.path]
    got = read_shard(_shard(tmp_path, spec, [date]), spec, Storage())
    assert got.tables["proc"]["machine_id"].to_list() == ["a", "a"] and got.rows_read == {"2024-01-02": 2}
    (found,) = check_data(spec)
    assert found.files == 1 and not found.problems and found.notes[0].startswith(
        "a Delta table: read as its log says (1 files; 1 more in its folders that it no longer holds - replaced by ")
    mapped = tmp_path / "mapped"         # column mapping, partitioned by the machine: listed from its log by time
    write_deltalake(str(mapped), rows, partition_by=["machine_id"], configuration={"delta.columnMapping.mode": "name"})
    found = list_partition_files(_proc_spec(tiny_spec, mapped), [date], Storage())
    assert sorted((f.name.split("/")[0], f.span) for f in found) == [("machine_id=a", (date, date)),
                                                                     ("machine_id=b", (date, date))]
    with pytest.raises(DataError, match=r"mapped: a Delta table with no partition column for the level "
                                        r"'date=%Y-%m-%d' .*\(its partition columns: machine_id\)"):
        list_table_files(Storage(), str(mapped), "date")                 # no time to list it by


def test_a_delta_table_with_column_mapping_is_read_by_its_log(tmp_path, tiny_spec):
    """A Delta table with column mapping (its files name the columns by physical names and lie in folders of random
    names) is listed from its log: each file's date and other partition values from there, its columns' physical
    names with it. `read_shard`, the row digests, staging's split (its pieces named as read), profile's counts and
    check-data read its rows as those of the same rows in plain `date=` folders; a mapping that stores a column
    under another column's name is an error naming the table."""
    import datetime as dt
    from dataclasses import replace
    from types import SimpleNamespace

    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from deltalake import write_deltalake

    from pipelines.check_data import check_data
    from pipelines.delta_sink import _physical_names
    from pipelines.ingest import read_shard
    from pipelines.profile import file_counts, modality_files
    from pipelines.row_digests import date_digests
    from pipelines.shards import list_partition_files
    from pipelines.staging import split_file
    from pipelines.storage import DataError, Storage

    day = 1_704_153_600_000_000                                        # 2024-01-02 00:00 UTC
    rows = pa.table({"date": ["2024-01-01"] + ["2024-01-02"] * 4, "machine_id": ["a", "a", "a", "b", "b"],
                     "ts": pa.array([day - 60_000_000] + [day + i * 60_000_000 for i in range(4)],
                                    pa.timestamp("us", tz="UTC")),
                     "temp": [0.5, 1.0, 2.0, 3.0, 4.0]})
    date = dt.date(2024, 1, 2)
    plain = tmp_path / "plain"
    for d in ("2024-01-01", "2024-01-02"):
        (plain / f"date={d}").mkdir(parents=True)
        pq.write_table(rows.filter(pc.equal(rows["date"], d)).drop(["date"]), plain / f"date={d}" / "p.parquet")
    plain_spec = _proc_spec(tiny_spec, plain)
    expected = read_shard(_shard(tmp_path, plain_spec, [date]), plain_spec, Storage())
    columns = {"proc": plain_spec.columns_read(plain_spec.modalities["proc"])}
    plain_digests = date_digests(plain_spec, list_partition_files(plain_spec, [date], Storage()), columns)["proc"]
    for partition_by in (["date", "machine_id"], ["date"]):      # the entity kept in the log's partition values
        table = tmp_path / "_".join(partition_by)
        write_deltalake(str(table), rows, partition_by=partition_by,
                        configuration={"delta.columnMapping.mode": "name"})
        assert not list(table.glob("date=*"))                     # random folder names: nothing to walk
        spec = _proc_spec(tiny_spec, table)
        listed = list_partition_files(spec, [date], Storage())
        assert {f.date for f in listed} == {date} and len(listed) == len(partition_by)
        names = dict(listed[0].stored_names)
        assert names["temp"].startswith("col-") and names["ts"].startswith("col-")
        if len(partition_by) == 2:
            assert sorted(f.name.split("/")[0] for f in listed) == ["machine_id=a", "machine_id=b"]
        got = read_shard(_shard(tmp_path, spec, [date]), spec, Storage())
        assert got.tables["proc"].sort("machine_id", "_t").equals(expected.tables["proc"].sort("machine_id", "_t"))
        assert got.rows_read == expected.rows_read == {"2024-01-02": 4}
        assert got.row_digests["2024-01-02"]["proc"].to_dict() == plain_digests.to_dict()
        assert date_digests(spec, listed, columns)["proc"].to_dict() == plain_digests.to_dict()
        counted = [file_counts(part) for part in modality_files(spec, spec.modalities["proc"], Storage(), [date])]
        assert sum(int(c["rows"].sum()) for c in counted) == 4 and sum(int(c["nulls"].sum()) for c in counted) == 0
        (found,) = check_data(spec)
        assert not found.problems and found.dates == [dt.date(2024, 1, 1), date]
        assert set(found.columns) == {"ts", "temp", "machine_id"} and not found.renamed
        assert "with column mapping: listed from its log, its files' columns read by their physical names" in \
            found.notes[0]
    by_day = tmp_path / "by_day"                  # a layout of integer partition columns: month 1 is month=01
    write_deltalake(str(by_day), rows.append_column("year", pa.array([2024] * 5)).append_column(
        "month", pa.array([1] * 5)).append_column("day", pc.utf8_slice_codeunits(rows["date"], 8)).drop(["date"]),
        partition_by=["year", "month", "day"], configuration={"delta.columnMapping.mode": "name"})
    layout = replace(spec.modalities["proc"], path=str(by_day), partition="year=%Y/month=%m/day=%d")
    by_layout = replace(spec, modalities={"proc": layout})
    assert [f.date for f in list_partition_files(by_layout, [date], Storage())] == [date]
    split = split_file(listed[0], spec, Storage(), 2, str(tmp_path / "staged"))    # a's and b's rows in one group
    pieces = [pl.read_parquet(p.path) for ps in split.pieces.values() for p in ps]
    assert all(set(p.columns) == {"machine_id", "ts", "temp"} for p in pieces)    # named as read
    assert sorted(pl.concat(pieces)["temp"].to_list()) == [1.0, 2.0, 3.0, 4.0]
    field = SimpleNamespace                                           # a mapping renamed into another column's name
    with pytest.raises(DataError, match=r"t: a Delta table whose column mapping stores column 'a' under the name of "
                                        r"its column 'b'"):
        _physical_names("t", [field(name="a", metadata={"delta.columnMapping.physicalName": "b"}, type="double"),
                              field(name="b", metadata={"delta.columnMapping.physicalName": "c"}, type="double")])


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "in-a-file"])
def test_rows_a_deletion_vector_removes_are_not_read(tmp_path, tiny_spec, monkeypatch, inline):
    """A DELETE that marks rows deleted in place (a deletion vector, as Spark and Databricks write them, inline in the
    log or in a file beside the data): the listing carries the deleted positions (as delta-rs decodes them) and a
    changed digest; `read_shard`, the row digests, a big row group read in parts, profile's counts and check-data
    leave those rows out, as if the file held only the others."""
    import datetime as dt

    import pyarrow.parquet as pq
    from deltalake import DeltaTable, WriterProperties, write_deltalake

    from pipelines import parquet_files
    from pipelines.check_data import check_data
    from pipelines.ingest import read_shard
    from pipelines.parquet_files import each_row_group, open_parquet
    from pipelines.profile import Columns, FilePart, file_counts
    from pipelines.row_digests import date_digests
    from pipelines.shards import list_partition_files, partition_files
    from pipelines.staging import split_file
    from pipelines.storage import Storage
    from tests.deletion_vectors import delete_in_place

    table = tmp_path / "proc"
    spec = _proc_spec(tiny_spec, table)
    day = 1_704_153_600_000_000                                        # 2024-01-02 00:00 UTC
    rows = pa.table({"date": ["2024-01-02"] * 6, "machine_id": ["a", "a", "a", "b", "b", "b"],
                     "ts": pa.array([day + i * 60_000_000 for i in range(6)], pa.timestamp("us", tz="UTC")),
                     "temp": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]})
    write_deltalake(str(table), rows, partition_by=["date"], writer_properties=WriterProperties(max_row_group_size=4))
    date = dt.date(2024, 1, 2)
    (before,) = list_partition_files(spec, [date], Storage())
    assert before.deleted is None
    delete_in_place(table, before.path.rsplit("/", 1)[1], [1, 4], inline=inline)    # a's 2nd row, b's 2nd row
    kept = [1.0, 3.0, 4.0, 6.0]
    (listed,) = list_partition_files(spec, [date], Storage())
    (vector,) = DeltaTable(str(table)).deletion_vectors()
    assert pa.record_batch(vector).column("selection_vector")[0].as_py() == [True, False, True, True, False, True]
    assert listed.path == before.path and listed.deleted.count == 2
    digests = [partition_files(spec, [f], [date])[date].digests for f in (before, listed)]
    assert digests[0] != digests[1]
    with open_parquet(Storage().filesystem(str(table)), listed.path) as parquet:
        assert parquet.metadata.num_row_groups == 2                   # positions 0-3 and 4-5
        got = pa.concat_tables(each_row_group(parquet, listed.path, ["temp"], deleted=listed.deleted))
        assert got.column("temp").to_pylist() == kept
        monkeypatch.setattr(parquet_files, "PART_BYTES", 1)           # each row group read a row at a time
        parts = list(each_row_group(parquet, listed.path, ["temp"], None, Storage().filesystem(str(table)),
                                    listed.deleted))
        assert [p.num_rows for p in parts] == [1, 0, 1, 1, 0, 1]
        assert pa.concat_tables(parts).column("temp").to_pylist() == kept
        monkeypatch.undo()
    got = read_shard(_shard(tmp_path, spec, [date]), spec, Storage())
    assert got.tables["proc"]["temp"].to_list() == kept and got.rows_read == {"2024-01-02": 4}
    assert got.usable_rows == {"2024-01-02": {"proc": 4}}
    plain = tmp_path / "plain" / "date=2024-01-02"                    # the same rows without the deleted ones
    plain.mkdir(parents=True)
    pq.write_table(rows.drop(["date"]).take([0, 2, 3, 5]), plain / "part.parquet")
    plain_spec = _proc_spec(tiny_spec, tmp_path / "plain")
    columns = {"proc": spec.columns_read(spec.modalities["proc"])}
    ours = date_digests(spec, list_partition_files(spec, [date], Storage()), columns)["proc"]
    theirs = date_digests(plain_spec, list_partition_files(plain_spec, [date], Storage()), columns)["proc"]
    assert ours.to_dict() == theirs.to_dict() == got.row_digests["2024-01-02"]["proc"].to_dict()
    split = split_file(listed, spec, Storage(), 2, str(tmp_path / "staged"))     # a's and b's rows of group 0 moved
    assert split.kept == (1,) and sorted(pl.concat(pl.read_parquet(p.path) for ps in split.pieces.values()
                                                   for p in ps)["temp"].to_list()) == [1.0, 3.0, 4.0]
    counted = file_counts(FilePart(Columns.of(spec, spec.modalities["proc"]), date, listed.path, Storage(),
                                   str(table), deleted=listed.deleted))
    assert counted["rows"].tolist() == [4] and counted["nulls"].tolist() == [0]
    (found,) = check_data(spec)
    assert not found.problems and found.notes[0] == (
        "a Delta table: read as its log says (1 files; 2 rows of 1 files deleted in place by deletion vectors - not "
        "read (the footers' statistics this check reads still count them))")


def test_deleted_rows_are_held_as_runs_and_read_as_the_positions_were(monkeypatch):
    """A listing holds a file's rows deleted in place as runs: a million deleted rows together take 16 bytes; the
    rows a row group keeps, the count and the digest token are what the positions gave (a listing's digest does
    not change with the representation), for runs scattered or long, the token hashed a chunk at a time."""
    import hashlib

    import pipelines.delta_sink as delta_sink
    from pipelines.delta_sink import DeletedRows

    whole = DeletedRows.of(np.arange(2_000_000, 3_000_000))
    assert len(whole.runs) == 16 and whole.count == 1_000_000
    assert whole.kept(0, 2_000_000) is None and whole.kept(3_000_000, 10) is None
    assert whole.kept(2_999_998, 4).tolist() == [False, False, True, True]
    monkeypatch.setattr(delta_sink, "TOKEN_CHUNK_ROWS", 7)            # runs split across chunks, chunks across runs
    rng = np.random.default_rng(0)
    for trial in range(60):
        positions = np.unique(np.r_[rng.integers(0, 300, int(rng.integers(1, 120))), np.arange(trial, trial * 3)])
        deleted = DeletedRows.of(rng.permutation(positions))
        mask = np.zeros(320, bool)
        mask[positions] = True
        assert DeletedRows.of_mask(mask) == deleted and deleted.count == len(positions)
        as_positions = np.sort(positions).astype("<i8").tobytes()
        assert deleted.token() == f"{len(positions)}:{hashlib.sha256(as_positions).hexdigest()[:16]}"
        start, rows = int(rng.integers(0, 300)), int(rng.integers(1, 80))
        gone = positions[(positions >= start) & (positions < start + rows)] - start
        keep = deleted.kept(start, rows)
        assert (keep is None) == (len(gone) == 0)
        assert keep is None or np.flatnonzero(~keep).tolist() == gone.tolist()


def test_a_delta_table_not_partitioned_by_date_is_read_by_its_time_statistics(tmp_path, tiny_spec):
    """A Delta table not partitioned by the date (liquid clustering, or partitioned by the machine only): each file
    is listed under every date from its least to its greatest time by the log's statistics, and each date reads
    only its rows of it - `read_shard` (nothing misplaced; a row without a time counted on its file's first date),
    the row digests (equal to plain `date=` folders holding the same rows), profile's counts and check-data. A
    time kept as text gives no statistics to list by: an error naming the file. Staging's pieces of a file listed
    under two dates of one shard are read for each date."""
    import datetime as dt
    from dataclasses import replace

    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from deltalake import WriterProperties, write_deltalake

    from pipelines.check_data import check_data
    from pipelines.ingest import read_shard
    from pipelines.parquet_files import RowTimes, list_table_files, open_parquet
    from pipelines.profile import file_counts, modality_files
    from pipelines.row_digests import date_digests
    from pipelines.shards import InputFile, Shard, list_partition_files
    from pipelines.staging import SplitFile, with_pieces
    from pipelines.storage import DataError, Storage

    day = 1_704_153_600_000_000                                        # 2024-01-02 00:00 UTC
    minute = 60_000_000
    first = pa.table({"machine_id": ["a", "b", "a", "b"],                # 2024-01-01 23:58 .. 2024-01-02 00:01
                      "ts": pa.array([day - 2 * minute, day - minute, day, day + minute], pa.timestamp("us", tz="UTC")),
                      "temp": [1.0, 2.0, 3.0, 4.0]})
    second = pa.table({"machine_id": ["a", "b", "a"],                    # 2024-01-02 12:00 .. 2024-01-03 00:00
                       "ts": pa.array([day + 720 * minute, None, day + 1440 * minute], pa.timestamp("us", tz="UTC")),
                       "temp": [5.0, 6.0, 7.0]})
    table = tmp_path / "clustered"
    write_deltalake(str(table), first, writer_properties=WriterProperties(max_row_group_size=2))  # a group a date
    write_deltalake(str(table), second, mode="append")
    spec = _proc_spec(tiny_spec, table)
    dates = [dt.date(2024, 1, 1), dt.date(2024, 1, 2), dt.date(2024, 1, 3)]
    listed = list_partition_files(spec, dates, Storage())
    assert sorted((f.date, f.span) for f in listed) == [(dates[0], (dates[0], dates[1])),
                                                       (dates[1], (dates[0], dates[1])),
                                                       (dates[1], (dates[1], dates[2])),
                                                       (dates[2], (dates[1], dates[2]))]
    plain = tmp_path / "plain"                                           # the same rows in date folders
    both = pa.concat_tables([first, second])
    for d in dates:
        (plain / f"date={d}").mkdir(parents=True)
        pq.write_table(both.filter(pc.equal(pc.strftime(both["ts"], "%Y-%m-%d"), d.isoformat())),
                       plain / f"date={d}" / "p.parquet")
    plain_spec = _proc_spec(tiny_spec, plain)
    columns = {"proc": spec.columns_read(spec.modalities["proc"])}
    for d, rows in zip(dates, (2, 3, 1)):
        got = read_shard(_shard(tmp_path, spec, [d]), spec, Storage())
        expected = read_shard(_shard(tmp_path, plain_spec, [d]), plain_spec, Storage())
        assert got.tables["proc"].sort("machine_id", "_t").equals(expected.tables["proc"].sort("machine_id", "_t"))
        assert got.usable_rows == expected.usable_rows == {d.isoformat(): {"proc": rows}}
        assert got.quarantined["reason"].to_list() == (["null time column 'ts'"] if d == dates[1] else [])
        assert got.rows_read == {d.isoformat(): rows + (d == dates[1])}
        ours = date_digests(spec, list_partition_files(spec, [d], Storage()), columns)["proc"]
        theirs = date_digests(plain_spec, list_partition_files(plain_spec, [d], Storage()), columns)["proc"]
        assert ours.rows == rows + (d == dates[1]) and (d == dates[1] or ours.to_dict() == theirs.to_dict())
        parts = modality_files(spec, spec.modalities["proc"], Storage(), [d])
        counted = [file_counts(p) for p in parts]
        assert sum(int(c["rows"].sum()) for c in counted) == rows + (d == dates[1])
        assert sum(int(c["outside_partition"].sum()) for c in counted) == 0
        two = next((p for p in parts if p.span == (dates[0], dates[1])), None)      # profile reads only its group
        if two is not None:
            with open_parquet(Storage().filesystem(str(table)), two.path) as parquet:
                assert two.row_groups_of_date(parquet, two.columns.in_file(parquet.schema_arrow)) == [dates.index(d)]
    every = list_table_files(Storage(), str(table), "date", None, RowTimes("ts"))     # every date: each file once
    assert list(every.folders) == dates and [(f.date, f.span) for f in every.files] == [
        ("2024-01-01", ("2024-01-01", "2024-01-02")), ("2024-01-02", ("2024-01-02", "2024-01-03"))]
    (found,) = check_data(spec)
    assert not found.problems and not found.misplaced and found.files == 2 and found.dates == dates
    assert "not partitioned by the date: each file read for every date from its first to its last time" in \
        found.notes[0]
    daily = tmp_path / "daily"                              # a time kept as a date: its statistics are days
    write_deltalake(str(daily), pa.table({"machine_id": ["a", "a"], "ts": pa.array(dates[1:], pa.date32()),
                                          "temp": [1.0, 2.0]}))
    assert [(f.date, f.span) for f in list_table_files(Storage(), str(daily), "date", dates, RowTimes("ts")).files] \
        == [(d.isoformat(), ("2024-01-02", "2024-01-03")) for d in dates[1:]]
    text = tmp_path / "text_times"                                       # text times: no order to list by
    write_deltalake(str(text), first.set_column(1, "ts", pc.cast(first["ts"], pa.string())))
    with pytest.raises(DataError, match=r"text_times: a Delta table not partitioned by the date .* keeps none that "
                                        r"give a time for part-.*\.parquet \(a time stored as text\)"):
        list_partition_files(_proc_spec(tiny_spec, text), dates, Storage())
    # staging: a file split once, read for each date it is listed under in one shard
    source = [f for f in listed if f.span == (dates[0], dates[1])]
    piece = InputFile("proc", dates[0], str(tmp_path / "piece.parquet"), 1, name=source[0].name, span=source[0].span)
    shard = Shard(tuple(dates[1:2]), 0, 2, tuple(source))
    (left, right) = with_pieces(shard, [SplitFile(source[0], 2, {0: (piece,)})]).files
    assert (left.date, right.date) == (dates[0], dates[1]) and left.path == right.path == piece.path


def test_view_typed_columns_are_read_split_and_filtered_as_plain_strings(tmp_path, tiny_spec):
    """A file whose entity is stored as Arrow's string_view (as delta-rs writes the files an UPDATE or MERGE rewrites):
    `read_shard` reads it, staging's split sorts its rows by bucket and a deletion vector's rows are left out - the
    view read as a large string, which pyarrow's take and filter kernels take."""
    import datetime as dt

    import pyarrow.parquet as pq

    from pipelines.delta_sink import DeletedRows
    from pipelines.ingest import read_shard
    from pipelines.parquet_files import each_row_group, open_parquet
    from pipelines.shards import list_partition_files
    from pipelines.staging import split_file
    from pipelines.storage import Storage

    day = 1_704_153_600_000_000                                        # 2024-01-02 00:00 UTC
    folder = tmp_path / "proc" / "date=2024-01-02"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"machine_id": pa.array(["a", "b", "a", "b"], pa.string_view()),
                             "ts": pa.array([day + i * 60_000_000 for i in range(4)], pa.timestamp("us", tz="UTC")),
                             "temp": [1.0, 2.0, 3.0, 4.0]}), folder / "part.parquet")
    spec = _proc_spec(tiny_spec, tmp_path / "proc")
    date = dt.date(2024, 1, 2)
    (listed,) = list_partition_files(spec, [date], Storage())
    with open_parquet(Storage().filesystem(str(folder)), listed.path) as parquet:
        assert parquet.schema_arrow.field("machine_id").type == pa.string_view()
        kept = pa.concat_tables(each_row_group(parquet, listed.path, ["machine_id", "temp"],
                                               deleted=DeletedRows.of(np.array([1]))))
    assert kept.column("machine_id").to_pylist() == ["a", "a", "b"] and kept.column("temp").type == pa.float64()
    got = read_shard(_shard(tmp_path, spec, [date]), spec, Storage())
    assert sorted(got.tables["proc"]["temp"].to_list()) == [1.0, 2.0, 3.0, 4.0]
    split = split_file(listed, spec, Storage(), 2, str(tmp_path / "staged"))
    assert sorted(pl.concat(pl.read_parquet(p.path) for ps in split.pieces.values() for p in ps)["temp"].to_list()) \
        == [1.0, 2.0, 3.0, 4.0]


def _older_file_reads_pressure_as_null(tmp_path, spec, date, listed, older, added_to: str, read_so: str) -> None:
    """The checks shared by a Delta table's added column and a plain table's `added_columns`: of 'proc' with columns
    temp and pressure, a date's two files `listed` (3 rows; `older`, of a's and b's first rows, without pressure) -
    `read_shard`, the row digests, profile's counts, check-data's note and staging's split read its pressure as null
    (`added_to`, `read_so`: how check-data's note words the table and the reading)."""
    from pipelines.check_data import check_data
    from pipelines.ingest import read_shard
    from pipelines.profile import file_counts, modality_files
    from pipelines.row_digests import date_digests
    from pipelines.staging import split_file
    from pipelines.storage import Storage

    got = read_shard(_shard(tmp_path, spec, [date]), spec, Storage())
    rows = got.tables["proc"].sort("_t")
    assert rows["temp"].to_list() == [1.0, 2.0, 3.0] and rows["pressure"].to_list() == [None, None, 5.0]
    assert got.rows_read == {"2024-01-02": 3} and got.usable_rows == {"2024-01-02": {"proc": 3}}   # in any column
    assert got.quarantined.select("entity", "_t", "date", "source", "reason").rows() == [   # one note for the file
        (None, None, "2024-01-02", "proc", f"column 'pressure' is not in file '{older.path}' (added to its table "
                                           "since it was written): 2 row(s) read without it (the row's other columns "
                                           "used)")]
    columns = {"proc": spec.columns_read(spec.modalities["proc"])}
    assert date_digests(spec, listed, columns)["proc"].rows == 3
    counted = [file_counts(p) for p in modality_files(spec, spec.modalities["proc"], Storage(), [date])]
    assert sum(int(c["rows"].sum()) for c in counted) == 3 and sum(int(c["nulls"].sum()) for c in counted) == 2
    (found,) = check_data(spec)
    assert not found.problems and found.absent == {"pressure": [1, older.path]}
    assert [line for line in found.lines() if "column 'pressure'" in line] == [
        f"  column 'pressure' is not in 1 of 2 files (written before it was added to {added_to}, e.g. {older.path}): "
        f"read as null there, {read_so} - each of their rows' 'pressure' an unusable value (quarantined), the "
        "modality absent where no value of it is within its tolerance or window"]
    split = split_file(older, spec, Storage(), 2, str(tmp_path / "staged"))      # a's and b's rows in one group
    pieces = pl.concat(pl.read_parquet(p.path) for ps in split.pieces.values() for p in ps)
    assert sorted(pieces["temp"].to_list()) == [1.0, 2.0] and pieces["pressure"].null_count() == 2


def test_a_column_added_to_a_delta_table_since_a_file_was_written_is_null_there(tmp_path, tiny_spec):
    """A Delta table whose schema gained a value column after some files were written (schema evolution: a MERGE
    or an append with mergeSchema, ALTER TABLE ADD COLUMNS): its older files lack the column, which every Delta reader
    reads as null there - so does `read_shard` (the row kept for its other values, the missing one quarantined with
    its reason), staging's split, the row digests, profile's counts (nulls) and check-data, instead of failing the
    date; a plain Parquet file lacking it is an error naming the file and the column (without `added_columns`)."""
    import datetime as dt
    from dataclasses import replace

    import pyarrow.parquet as pq
    from deltalake import write_deltalake

    from pipelines.ingest import read_shard
    from pipelines.parquet_files import ABSENT, absent_columns
    from pipelines.shards import list_partition_files
    from pipelines.storage import DataError, Storage

    day = 1_704_153_600_000_000                                        # 2024-01-02 00:00 UTC
    minute = 60_000_000
    older = pa.table({"date": ["2024-01-02"] * 2, "machine_id": ["a", "b"],
                      "ts": pa.array([day, day + minute], pa.timestamp("us", tz="UTC")), "temp": [1.0, 2.0]})
    newer = pa.table({"date": ["2024-01-02"], "machine_id": ["a"],
                      "ts": pa.array([day + 2 * minute], pa.timestamp("us", tz="UTC")), "temp": [3.0],
                      "pressure": [5.0]})
    table = tmp_path / "proc"
    write_deltalake(str(table), older, partition_by=["date"])
    write_deltalake(str(table), newer, partition_by=["date"], mode="append", schema_mode="merge")
    spec = _proc_spec(tiny_spec, table)
    spec = replace(spec, modalities={"proc": replace(spec.modalities["proc"], columns=("temp", "pressure"))})
    date = dt.date(2024, 1, 2)
    listed = list_partition_files(spec, [date], Storage())
    assert len(listed) == 2 and all(f.table_columns == ("machine_id", "ts", "temp", "pressure") for f in listed)
    first = next(f for f in listed if "pressure" not in pq.read_schema(f.path).names)
    _older_file_reads_pressure_as_null(tmp_path, spec, date, listed, first, "the Delta table", "as Delta reads it")
    assert absent_columns(pa.schema([("col-1", pa.float64())]), ("temp", "pressure"),
                          (("temp", "col-1"), ("pressure", "col-2"))) == {"pressure": ABSENT}   # column mapping
    plain = tmp_path / "plain" / "date=2024-01-02"
    plain.mkdir(parents=True)
    pq.write_table(older.drop(["date"]), plain / "p.parquet")
    plain_spec = replace(spec, modalities={"proc": replace(spec.modalities["proc"], path=str(tmp_path / "plain"))})
    with pytest.raises(DataError, match=r"p\.parquet.*'pressure'"):
        read_shard(_shard(tmp_path, plain_spec, [date]), plain_spec, Storage())


def test_a_file_that_is_no_parquet_fails_its_date_or_is_left_out_and_named_with_unreadable_files_skip(tmp_path,
                                                                                                   tiny_spec, caplog):
    """An input file whose bytes are no Parquet (empty, truncated): by default an error naming it (`UnreadableFile`,
    a DataError) - with `unreadable_files: skip` left out of its date, named once (by the date's first entity
    bucket) in the quarantine rows - a look-back day's under the shard's first date -, and left alone by the driver's
    schema check (the next file checked), staging's split (not split) and the row digests (none: its rows cannot be
    the ones scored). A file that cannot be fetched is no `UnreadableFile`."""
    import datetime as dt
    import pickle
    from dataclasses import replace

    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from pipelines.ingest import read_shard, require_columns
    from pipelines.parquet_files import UnreadableFile, open_parquet
    from pipelines.row_digests import date_digests
    from pipelines.shards import Shard, list_inputs
    from pipelines.staging import split_file
    from pipelines.storage import Storage
    from pipelines.train import aligned_batches, left_out_files

    table = tmp_path / "proc"
    day = 1_704_153_600_000_000                                        # 2024-01-02 00:00 UTC
    for date, first in (("2024-01-01", day - 60_000_000), ("2024-01-02", day)):
        (table / f"date={date}").mkdir(parents=True)
        pq.write_table(pa.table({"machine_id": ["a", "b"], "ts": pa.array([first, first + 1], pa.timestamp(
            "us", tz="UTC")), "temp": [1.0, 2.0]}), table / f"date={date}" / "good.parquet")
    whole = (table / "date=2024-01-02" / "good.parquet").read_bytes()
    (table / "date=2024-01-02" / "a-truncated.parquet").write_bytes(whole[: len(whole) // 2])
    (table / "date=2024-01-01" / "empty.parquet").write_bytes(b"")
    spec = _proc_spec(tiny_spec, table)
    date = dt.date(2024, 1, 2)
    files = list_inputs(spec, [date], Storage())
    truncated = next(f for f in files if f.path.endswith("a-truncated.parquet"))
    with pytest.raises(UnreadableFile, match=r"empty\.parquet: not a readable Parquet file \(Parquet file size is 0 "):
        read_shard(Shard((date,), 0, 1, tuple(files)), spec, Storage())
    with pytest.raises(UnreadableFile, match=r"a-truncated\.parquet: .*Parquet magic bytes not found"):
        read_shard(Shard((date,), 0, 1, tuple(f for f in files if f.date == date)), spec, Storage())
    with pytest.raises(UnreadableFile, match=r"empty\.parquet: .*Parquet file size is 0 bytes"):
        require_columns(spec, Storage(), sorted(files, key=lambda f: f.path))
    with pytest.raises(DataError, match="not a readable Parquet file") as missing:
        open_parquet(pafs.LocalFileSystem(), str(table / "gone.parquet"))
    assert not isinstance(missing.value, UnreadableFile)
    again = pickle.loads(pickle.dumps(UnreadableFile("/a.parquet", "bad")))    # a Ray task's error, as raised
    assert (type(again), str(again), again.reason) == (UnreadableFile, "/a.parquet: not a readable Parquet file "
                                                                      "(bad)", "bad")
    skip = replace(spec, unreadable_files="skip")
    caplog.set_level("WARNING")
    assert [s.names for s in require_columns(skip, Storage(), sorted(files, key=lambda f: f.path))["proc"]] == [
        ["machine_id", "ts", "temp"]] * 2                  # the first readable file and the newest
    got = read_shard(Shard((date,), 0, 2, tuple(files)), skip, Storage())
    assert got.quarantined.select("entity", "_t", "date", "source").rows() == [(None, None, "2024-01-02", "proc")] * 2
    assert sorted(got.quarantined["reason"]) == [
        f"unreadable Parquet file '{table}/date=2024-01-01/empty.parquet' of 2024-01-01 (read around the date): "
        "Parquet file size is 0 bytes - left out (unreadable_files: skip)",
        f"unreadable Parquet file '{truncated.path}': Parquet magic bytes not found in footer. Either the file is "
        "corrupted or this is not a parquet file. - left out (unreadable_files: skip)"]
    other = read_shard(Shard((date,), 1, 2, tuple(files)), skip, Storage())
    assert other.quarantined.is_empty()
    counts = aligned_batches(Shard((date,), 0, 2, tuple(files)), skip, Storage()).counts   # training's passes
    assert counts == {"proc": 2, **{why: 1 for why in got.quarantined["reason"]}}
    assert left_out_files(counts, "training days 2024-01-02..2024-01-02") == {"proc": 2}
    assert sorted(r.getMessage() for r in caplog.records if r.levelname == "WARNING") == sorted(
        f"training days 2024-01-02..2024-01-02: {why}" for why in got.quarantined["reason"])
    read = [t for g in (got, other) if "proc" in g.tables for t in g.tables["proc"]["temp"].to_list()]
    assert sorted(read) == [1.0, 1.0, 2.0, 2.0]           # the good files of the date and of the look-back day
    assert split_file(truncated, skip, Storage(), 2, str(tmp_path / "staged")).pieces is None
    with pytest.raises(UnreadableFile):
        split_file(truncated, spec, Storage(), 2, str(tmp_path / "staged"))
    own = [f for f in files if f.date == date]
    assert date_digests(skip, own, {"proc": spec.columns_read(spec.modalities["proc"])}) == {"proc": None}


def test_a_column_a_file_lacks_reads_as_null_of_its_kind(tmp_path, tiny_spec):
    """A column a file lacks that its table has (`file_values`: a Delta table's added column, `added_columns`) is a
    null of Arrow's null type (`ABSENT`): a frame's, a log line's and a number's pass their kind's type check and
    read as nulls of the kind's values (each row's value unusable), as a column a writer stored without a value."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from pipelines.ingest import plain_values
    from pipelines.parquet_files import ABSENT, each_row_group, open_parquet, with_path_fields

    path = str(tmp_path / "f.parquet")
    pq.write_table(pa.table({"machine_id": ["a", "b"], "ts": pa.array([0, 1], pa.timestamp("us", tz="UTC"))}), path)
    for name, expected in (("cam", pa.binary()), ("logs", pa.string()), ("proc", pa.float64())):
        m = tiny_spec.modalities[name]
        values = {m.value_columns[0]: ABSENT}
        with open_parquet(pafs.LocalFileSystem(), path) as parquet:
            check_schema(with_path_fields(parquet.schema_arrow, values), tiny_spec, m, path)
            (part,) = each_row_group(parquet, path, ["machine_id", "ts", m.value_columns[0]], values=values)
        read = plain_values(part, m).column(m.value_columns[0])
        assert read.type == expected and read.null_count == 2, name


def test_a_column_a_plain_table_gained_is_null_in_older_files_with_added_columns(tmp_path, tiny_spec):
    """`added_columns`: a plain Parquet table that gained a value column after some files were written (a new tag,
    Spark's mergeSchema) reads it as null in the files without it, as a Delta table's do - `read_shard` (the row kept
    for its other values, the missing one quarantined), staging's split, the row digests, profile's counts and
    check-data (a note; a problem where no file holds the column); a file holding it under a former name reads it
    there. Without `added_columns` such a file is an error naming the file and the column, and saying how."""
    import datetime as dt
    from dataclasses import replace

    import pyarrow.parquet as pq

    from pipelines.check_data import check_data
    from pipelines.ingest import read_shard
    from pipelines.shards import list_partition_files
    from pipelines.storage import DataError, Storage

    day = 1_704_153_600_000_000                                        # 2024-01-02 00:00 UTC
    minute = 60_000_000
    table = tmp_path / "proc"
    folder = table / "date=2024-01-02"
    folder.mkdir(parents=True)
    first_two = pa.array([day, day + minute], pa.timestamp("us", tz="UTC"))
    pq.write_table(pa.table({"machine_id": ["a", "b"], "ts": first_two, "temp": [1.0, 2.0]}), folder / "older.parquet")
    pq.write_table(pa.table({"machine_id": ["a"], "ts": pa.array([day + 2 * minute], pa.timestamp("us", tz="UTC")),
                             "temp": [3.0], "pressure": [5.0]}), folder / "newer.parquet")
    spec = _proc_spec(tiny_spec, table)
    proc = replace(spec.modalities["proc"], columns=("temp", "pressure"))
    date = dt.date(2024, 1, 2)
    strict = replace(spec, modalities={"proc": proc})
    with pytest.raises(DataError, match=r"older\.parquet.*column 'pressure' not found.*reads null here with its "
                                        r"added_columns"):
        read_shard(_shard(tmp_path, strict, [date]), strict, Storage())
    spec = replace(spec, modalities={"proc": replace(proc, added_columns=("pressure",))})
    listed = list_partition_files(spec, [date], Storage())
    assert [f.table_columns for f in listed] == [("pressure",)] * 2
    older = next(f for f in listed if f.path.endswith("older.parquet"))
    _older_file_reads_pressure_as_null(tmp_path, spec, date, listed, older, "the table", "by added_columns")
    # the older file holding it under its former name: read there, not null
    pq.write_table(pa.table({"machine_id": ["a", "b"], "ts": first_two, "temp": [1.0, 2.0], "p_old": [7.0, 8.0]}),
                   folder / "older.parquet")
    renamed = replace(spec, modalities={"proc": replace(spec.modalities["proc"],
                                                        former_names=(("pressure", ("p_old",)),))})
    got = read_shard(_shard(tmp_path, renamed, [date]), renamed, Storage())
    assert got.tables["proc"].sort("_t")["pressure"].to_list() == [7.0, 8.0, 5.0] and got.quarantined.is_empty()
    assert check_data(renamed)[0].absent == {}
    # a name no file holds: every value null - a problem, not a note
    typo = replace(spec, modalities={"proc": replace(proc, columns=("temp", "presure"), added_columns=("presure",))})
    assert "modality 'proc': column 'presure' (added_columns) is in none of its 2 files - every value of it would be " \
           "null (a misspelt name?)" in check_data(typo)[0].problems


def test_a_column_renamed_upstream_is_read_under_its_former_name(tmp_path, tiny_spec):
    """`former_names`: a date whose older file stores the value column under its former name is read whole - the
    listing's files, `read_shard` (staged or not), the row digests (a file rewritten under the new name holds the
    same rows), profile's counts and check-data, which says so; a file with neither name is an error naming both."""
    import datetime as dt
    from dataclasses import replace

    import pyarrow.parquet as pq

    from pipelines.check_data import check_data
    from pipelines.ingest import check_schema, read_shard
    from pipelines.profile import Columns, FilePart, file_counts
    from pipelines.row_digests import date_digests
    from pipelines.shards import list_partition_files
    from pipelines.staging import split_file
    from pipelines.storage import DataError, Storage

    table = tmp_path / "proc"
    spec = _proc_spec(tiny_spec, table)
    spec = replace(spec, modalities={"proc": replace(spec.modalities["proc"], former_names=(("temp", ("t_old",)),))})
    day = 1_704_153_600_000_000                                        # 2024-01-02 00:00 UTC
    folder = table / "date=2024-01-02"
    folder.mkdir(parents=True)
    def rows(name, ids, first):
        return pa.table({"machine_id": ids, "ts": pa.array([day + (first + i) * 60_000_000 for i in range(len(ids))],
                                                           pa.timestamp("us", tz="UTC")),
                         name: [float(first + i) for i in range(len(ids))]})
    pq.write_table(rows("t_old", ["a", "b", "a"], 0), folder / "old.parquet")      # before the rename
    pq.write_table(rows("temp", ["a", "b"], 10), folder / "new.parquet")
    date = dt.date(2024, 1, 2)
    got = read_shard(_shard(tmp_path, spec, [date]), spec, Storage())
    assert sorted(got.tables["proc"]["temp"].to_list()) == [0.0, 1.0, 2.0, 10.0, 11.0]
    assert got.usable_rows == {"2024-01-02": {"proc": 5}}
    files = list_partition_files(spec, [date], Storage())
    old = next(f for f in files if f.path.endswith("old.parquet"))
    split = split_file(old, spec, Storage(), 2, str(tmp_path / "staged"))         # its pieces name it as it is now
    assert all(pq.read_schema(p.path).names == ["machine_id", "ts", "temp"] for ps in split.pieces.values() for p in ps)
    columns = {"proc": spec.columns_read(spec.modalities["proc"])}
    before = date_digests(spec, files, columns)["proc"].to_dict()
    assert before == got.row_digests["2024-01-02"]["proc"].to_dict()
    pq.write_table(pq.read_table(folder / "old.parquet").rename_columns(["machine_id", "ts", "temp"]),
                   folder / "old.parquet")                             # rewritten under the new name
    assert date_digests(spec, list_partition_files(spec, [date], Storage()), columns)["proc"].to_dict() == before
    pq.write_table(rows("t_old", ["a", "b", "a"], 0), folder / "old.parquet")
    counted = file_counts(FilePart(Columns.of(spec, spec.modalities["proc"]), date, old.path, Storage(), str(table)))
    assert counted["rows"].tolist() == [3] and counted["nulls"].tolist() == [0]
    (found,) = check_data(spec)
    assert not found.problems and f"  column 'temp' read under its former name 't_old' (former_names) in 1 of 2 " \
        f"files, e.g. {old.path}" in found.lines()
    with pytest.raises(DataError, match=r"modality 'proc' \(x.parquet\): column 'temp' not found, nor under its "
                                        r"other names \['t_old'\] \(former_names\)"):
        check_schema(rows("t", ["a"], 0).schema, spec, spec.modalities["proc"], "x.parquet")
    plain = _proc_spec(tiny_spec, table)                                # without former_names: where to set them
    with pytest.raises(DataError, match=r"column 'temp' not found; columns are \['machine_id', 't_old', 'ts'\] - a "
                                        r"column renamed upstream is read under either name with the modality's "
                                        r"former_names"):
        check_schema(rows("t_old", ["a"], 0).schema, plain, plain.modalities["proc"], "x.parquet")


def test_an_entity_kept_in_the_folder_names_only_is_read_from_them(tmp_path, tiny_spec):
    """A table partitioned by the date and the machine (Spark's `partitionBy("date", "machine_id")`: the files hold
    neither column): the machine is each row's folder value - `read_shard`, an entity bucket reading only its
    machines' files (by their folders, no statistics needed), staging leaving such files whole, the row digests
    (the same as a flat table's with the column in its files), profile's counts and check-data; Hive's null folder
    is a null key, quarantined."""
    import datetime as dt
    from dataclasses import replace

    import polars as pl
    import pyarrow.parquet as pq

    from pipelines.check_data import check_data
    from pipelines.ingest import read_shard
    from pipelines.profile import modality_files, file_counts
    from pipelines.row_digests import date_digests
    from pipelines.shards import bucket_of, list_partition_files
    from pipelines.staging import split_file
    from pipelines.storage import Storage

    day = 1_704_153_600_000_000                                        # 2024-01-02 00:00 UTC
    def rows(first, n):
        times = pa.array([day + (first + i) * 60_000_000 for i in range(n)], pa.timestamp("us", tz="UTC"))
        return pa.table({"ts": times, "temp": [float(first + i) for i in range(n)]})
    table, flat = tmp_path / "proc", tmp_path / "flat" / "date=2024-01-02"
    flat.mkdir(parents=True)
    for machine, first in (("a", 0), ("e", 10), ("c%2Fd", 20), ("__HIVE_DEFAULT_PARTITION__", 30)):
        folder = table / "date=2024-01-02" / f"machine_id={machine}"
        folder.mkdir(parents=True)
        pq.write_table(rows(first, 2), folder / "part-0.parquet")
        if machine in ("a", "e"):
            pq.write_table(rows(first, 2).add_column(0, "machine_id", pa.array([machine] * 2)),
                           flat / f"{machine}.parquet")
    spec = _proc_spec(tiny_spec, table)
    date = dt.date(2024, 1, 2)
    shard = _shard(tmp_path, spec, [date])
    got = read_shard(shard, spec, Storage())
    assert sorted(got.tables["proc"].select("machine_id", "temp").rows()) == [
        ("a", 0.0), ("a", 1.0), ("c/d", 20.0), ("c/d", 21.0), ("e", 10.0), ("e", 11.0)]
    assert got.quarantined["reason"].to_list() == ["null entity column 'machine_id'"] * 2
    assert {bucket_of(m, 2) for m in ("a", "e")} == {0, 1}
    for bucket in (0, 1):                                   # each bucket: its own machines' files
        mine = read_shard(replace(shard, bucket=bucket, buckets=2), spec, Storage()).tables["proc"]
        assert set(mine["machine_id"]) == {m for m in ("a", "e", "c/d") if bucket_of(m, 2) == bucket}
    files = list_partition_files(spec, [date], Storage())
    a = next(f for f in files if "machine_id=a/" in f.path)
    assert split_file(a, spec, Storage(), 2, str(tmp_path / "staged")).pieces is None        # one machine: whole
    plain = _proc_spec(tiny_spec, tmp_path / "flat")
    columns = {"proc": spec.columns_read(spec.modalities["proc"])}
    ab = [f for f in files if "machine_id=a/" in f.path or "machine_id=e/" in f.path]
    assert date_digests(spec, ab, columns)["proc"].to_dict() == \
        date_digests(plain, list_partition_files(plain, [date], Storage()), columns)["proc"].to_dict()
    counted = pl.concat([pl.from_pandas(file_counts(part)) for part in modality_files(spec, spec.modalities["proc"],
                                                                                        Storage(), [date])])
    assert counted["rows"].sum() == 8 and counted["nulls"].sum() == 2        # the null folder's keys
    (found,) = check_data(spec)
    assert not found.problems and found.columns == {"ts": "timestamp[us, tz=UTC]", "temp": "double",
                                                    "machine_id": "string"}


def test_a_table_laid_out_by_machine_then_date_is_listed_per_machine_and_read_with_its_key(tmp_path, tiny_spec,
                                                                                           caplog):
    """A modality's own `partition: machine_id=*/date=%Y-%m-%d` (a folder per machine above its date folders, the
    files without the column): each date's files are those of every machine's folder of it, named after the machine's
    folder, so the key reads from there; a folder at the machine level that is not `machine_id=...` is warned of and
    not read; the other modalities keep the spec's partition."""
    import datetime as dt
    import logging
    from dataclasses import replace

    import pyarrow.parquet as pq

    from pipelines.ingest import read_shard
    from pipelines.shards import list_partition_files
    from pipelines.storage import Storage

    day = 1_704_153_600_000_000                                        # 2024-01-02 00:00 UTC
    table = tmp_path / "proc"
    for machine, date, first in (("a", "2024-01-02", 0), ("b", "2024-01-02", 10), ("a", "2024-01-01", -2),
                                 ("b", "2024-01-03", 1440)):
        folder = table / f"machine_id={machine}" / f"date={date}"
        folder.mkdir(parents=True)
        times = pa.array([day + (first + i) * 60_000_000 for i in range(2)], pa.timestamp("us", tz="UTC"))
        pq.write_table(pa.table({"ts": times, "temp": [float(first), float(first + 1)]}), folder / "part-0.parquet")
    (table / "backup" / "date=2024-01-02").mkdir(parents=True)
    spec = _proc_spec(tiny_spec, table)
    spec = replace(spec, modalities={"proc": replace(spec.modalities["proc"], partition="machine_id=*/date=%Y-%m-%d")})
    date = dt.date(2024, 1, 2)
    with caplog.at_level(logging.WARNING, logger="pipelines.storage"):
        files = list_partition_files(spec, [date], Storage())
    assert [(f.date.isoformat(), f.name) for f in files] == [("2024-01-02", "machine_id=a/part-0.parquet"),
                                                             ("2024-01-02", "machine_id=b/part-0.parquet")]
    assert "1 folder(s) not named machine_id=*/date=YYYY-MM-DD (a real date) are not read (backup)" in caplog.text
    got = read_shard(_shard(tmp_path, spec, [date]), spec, Storage())
    assert sorted(got.tables["proc"].select("machine_id", "temp").rows()) == [
        ("a", -2.0), ("a", -1.0), ("a", 0.0), ("a", 1.0), ("b", 10.0), ("b", 11.0)]   # a's look-back rows too
    assert got.rows_read == {"2024-01-02": 4}


def test_a_writers_missing_value_marker_is_unusable_like_a_null(tmp_path, tiny_spec):
    """`missing_values`: the numbers a writer stores where it has no value (a historian's -9999; here one stored as
    text too) are unusable values - the row kept for its other columns and the marker quarantined as such, a row of
    markers only quarantined whole - and profile counts them as nulls; without the key they are values, and
    check-data, which sees -9999 as a column's smallest value in the footers, suggests the key."""
    import datetime as dt
    from dataclasses import replace

    import pyarrow.parquet as pq

    from pipelines.check_data import check_data
    from pipelines.ingest import read_shard
    from pipelines.profile import file_counts, modality_files
    from pipelines.storage import Storage

    table = tmp_path / "proc" / "date=2024-01-02"
    table.mkdir(parents=True)
    day = 1_704_153_600_000_000                                        # 2024-01-02 00:00 UTC
    times = pa.array([day + i * 60_000_000 for i in range(4)], pa.timestamp("us", tz="UTC"))
    pq.write_table(pa.table({"machine_id": ["a"] * 4, "ts": times, "temp": [1.0, -9999.0, 3.0, -9999.0],
                             "pressure": ["5", "6", "-9999", "-9999"]}), table / "part-0.parquet")
    plain = _proc_spec(tiny_spec, tmp_path / "proc")
    plain = replace(plain, modalities={"proc": replace(plain.modalities["proc"], columns=("temp", "pressure"))})
    marked = replace(plain, modalities={"proc": replace(plain.modalities["proc"], missing_values=(
        ("temp", (-9999.0,)), ("pressure", (-9999.0,))))})
    date = dt.date(2024, 1, 2)
    got = read_shard(_shard(tmp_path, plain, [date]), plain, Storage())
    assert got.tables["proc"]["temp"].to_list() == [1.0, -9999.0, 3.0, -9999.0] and got.quarantined.is_empty()
    got = read_shard(_shard(tmp_path, marked, [date]), marked, Storage())
    assert got.tables["proc"].select("temp", "pressure").rows() == [(1.0, 5.0), (None, 6.0), (3.0, None)]
    assert sorted(got.quarantined["reason"].to_list()) == [
        "unusable value in column 'pressure' (the row's other columns used)", "unusable value in column 'temp'",
        "unusable value in column 'temp' (the row's other columns used)"]
    assert got.usable_rows == {"2024-01-02": {"proc": 3}}                # usable in any column
    counted = [file_counts(part)["nulls"].item() for spec in (plain, marked)
               for part in modality_files(spec, spec.modalities["proc"], Storage(), [date])]
    assert counted == [0, 4]
    (found,) = check_data(plain)                            # the footers show it: a note that names the key
    assert f"  column 'temp' reaches -9999 in 1 of 1 files (the footers' statistics), e.g. {table / 'part-0.parquet'}" \
        ": if that is its writer's number for a missing value, set modalities.proc.missing_values: {temp: [-9999]} " \
        "to read it as none" in found.lines()
    assert not any("reaches" in line for line in check_data(marked)[0].lines())


def test_a_renamed_time_and_entity_are_read_under_their_former_names(tmp_path, tiny_spec):
    """`former_names` of the time and the entity columns (as the modality's files name them): an older file's
    `timestamp` and `machine` are read as `ts` and `machine_id` - pruned by their statistics (a bucket, the look-back
    day), split by staging into pieces named as now, checked and typed for the key casts, and counted by profile."""
    import datetime as dt
    from dataclasses import replace

    import pyarrow.parquet as pq

    from pipelines.check_data import check_data
    from pipelines.ingest import entity_casts, read_shard, require_columns
    from pipelines.profile import Columns, FilePart, RowGroupsPart, file_counts, key_rows
    from pipelines.shards import bucket_of, list_partition_files
    from pipelines.staging import split_file
    from pipelines.storage import Storage

    spec = _proc_spec(tiny_spec, tmp_path / "proc")
    spec = replace(spec, modalities={"proc": replace(spec.modalities["proc"], former_names=(
        ("ts", ("timestamp",)), ("machine_id", ("machine",))))})
    day = 1_704_153_600_000_000                                        # 2024-01-02 00:00 UTC
    def rows(key, time, ids, first):
        times = pa.array([day + (first + i) * 60_000_000 for i in range(len(ids))], pa.timestamp("us", tz="UTC"))
        return pa.table({key: ids, time: times, "temp": [float(first + i) for i in range(len(ids))]})
    for date, name, table in (("2024-01-01", "old.parquet", rows("machine", "timestamp", ["a"], -1)),
                              ("2024-01-02", "old.parquet", rows("machine", "timestamp", ["a", "e", "a"], 0)),
                              ("2024-01-02", "new.parquet", rows("machine_id", "ts", ["e"], 10))):
        (tmp_path / "proc" / f"date={date}").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp_path / "proc" / f"date={date}" / name)
    date = dt.date(2024, 1, 2)
    shard = _shard(tmp_path, spec, [date])
    got = read_shard(shard, spec, Storage())
    assert sorted(got.tables["proc"].select("machine_id", "temp").rows()) == [
        ("a", -1.0), ("a", 0.0), ("a", 2.0), ("e", 1.0), ("e", 10.0)] and got.quarantined.is_empty()
    assert {bucket_of(m, 2) for m in ("a", "e")} == {0, 1}
    for bucket in (0, 1):
        mine = read_shard(replace(shard, bucket=bucket, buckets=2), spec, Storage()).tables["proc"]
        assert set(mine["machine_id"]) == {m for m in ("a", "e") if bucket_of(m, 2) == bucket}
    files = list_partition_files(spec, [date], Storage())
    old = next(f for f in files if f.path.endswith("old.parquet"))
    split = split_file(old, spec, Storage(), 2, str(tmp_path / "staged"))
    assert all(pq.read_schema(p.path).names == ["machine_id", "ts", "temp"] for ps in split.pieces.values() for p in ps)
    assert entity_casts(spec, require_columns(spec, Storage(), files)) == ()
    part = FilePart(Columns.of(spec, spec.modalities["proc"]), date, old.path, Storage(), str(tmp_path / "proc"))
    assert file_counts(part)["rows"].tolist() == [3] and len(key_rows(RowGroupsPart(part, (0,), 0))) == 3
    (found,) = check_data(spec)
    assert not found.problems


def test_a_machine_first_layout_listed_whole_finds_what_the_level_walk_finds_in_fewer_listings(tmp_path, caplog,
                                                                                                monkeypatch):
    """`list_partitions(..., whole=True)` on `machine_id=*/year=%Y/month=%m/day=%d`: each machine's folder listed once,
    recursively - the same date folders, files (names after the machine's folder), skipped side files and warned
    folders as the level walk (within the dates asked, also those the walk did not open), with a listing per
    machine instead of per level and date folder."""
    import datetime as dt
    import logging

    import pyarrow.fs as pafs

    from pipelines import storage as storage_module
    from pipelines.parquet_files import list_parquet_files
    from pipelines.storage import Storage, list_partitions

    table = tmp_path / "t"
    for name in ("machine_id=a/year=2024/month=01/day=05/part-0.parquet", "machine_id=a/year=2024/month=01/day=05/"
                 "hour=13/part-1.parquet", "machine_id=a/year=2024/month=01/day=06/part-0.parquet",
                 "machine_id=a/year=2024/month=01/day=06/_SUCCESS", "machine_id=a/year=2024/month=01/day=06/x.csv",
                 "machine_id=a/year=2024/month=02/day=30/part-0.parquet", "machine_id=a/year=2024/backup/x/p.parquet",
                 "machine_id=b/year=2023/month=12/day=31/part-0.parquet", "machine_id=b/year=2024/month=01/day=05/"
                 "_temporary/0/part-9.parquet", "machine_id=b/year=2024/month=01/day=05/part-0.parquet",
                 "machine_id=b/_tmp/year=2024/month=01/day=05/part-0.parquet",
                 "backup/year=2024/month=01/day=05/p.parquet"):
        (table / name).parent.mkdir(parents=True, exist_ok=True)
        (table / name).write_bytes(b"x")
    (table / "machine_id=b" / "year=2024" / "month=01" / "day=07").mkdir(parents=True)      # a date without files
    layout = "machine_id=*/year=%Y/month=%m/day=%d"
    listings = []
    real = storage_module._list_folders
    monkeypatch.setattr(storage_module, "_list_folders",
                        lambda fs, path, folders, *a: listings.extend(folders) or real(fs, path, folders, *a))
    fs = pafs.LocalFileSystem()
    for within in (None, (dt.date(2024, 1, 5), dt.date(2024, 1, 6))):
        seen = []
        for whole in (False, True):
            listings.clear()
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                folders = list_partitions(Storage(), str(table), layout, within, whole=whole)
                files = list_parquet_files(fs, folders)
            seen.append((sorted(folders), {d: sorted((f.path, f.above) for f in held) for d, held in folders.items()},
                         [(f.date, f.path, f.name) for f in files], len(listings),
                         sorted(r.getMessage() for r in caplog.records)))
        (walked, whole_listed) = seen
        assert walked[:3] == whole_listed[:3]
        assert walked[4] == whole_listed[4] if within is None else "day=30" in whole_listed[4][1]   # it sees it all
        assert whole_listed[3] == 3 < walked[3]                    # the table, then each machine's folder once
    assert [name for _, _, name in whole_listed[2]] == ["machine_id=a/hour=13/part-1.parquet",
                                                        "machine_id=a/part-0.parquet", "machine_id=b/part-0.parquet",
                                                        "machine_id=a/part-0.parquet"]
    assert "year=2024/backup" in caplog.text and "month=02/day=30" in caplog.text and "x.csv" in caplog.text


def test_transform_is_fitted_with_the_statistics_and_a_changed_spec_is_refused(tiny_spec):
    from dataclasses import replace

    vib = replace(tiny_spec.modalities["vib"], transform="centered")
    spec = replace(tiny_spec, modalities={**tiny_spec.modalities, "vib": vib})
    aligned = aligned_rows(spec)
    stats = StatisticsFitter(spec).add(aligned).result()
    assert stats["modalities"]["vib"]["transform"] == "centered"
    feats = featurize(aligned, spec, stats)
    present = feats.mask[:, list(spec.modalities).index("vib")]
    assert np.allclose(feats.inputs["vib"][present].sum(1), 0, atol=1e-5)          # each window centred
    with pytest.raises(ValueError, match="modality 'vib': the model was trained with transform 'centered'"):
        featurize(aligned, tiny_spec, stats)


def _series_rows(spec, level, entities=("a", "b"), ticks=12):
    """Aligned rows of the 2-channel series modality 'vib' (3 steps a window): channel a = level(i) + a wiggle,
    channel b = a stationary wiggle; tick i at i minutes."""
    keys, times, a, b = [], [], [], []
    for e in entities:
        for i in range(ticks):
            wiggle = [0.0, 1.0, -1.0] if i % 2 else [1.0, -1.0, 0.0]
            keys.append(e), times.append(T0 + i * M)
            a.append([level(i) + w for w in wiggle]), b.append([5.0 + w for w in wiggle])
    return pa.table({"machine_id": keys, TIME: pa.array(times, pa.int64()), "vib__present": [True] * len(keys),
                     "vib__a": pa.array(a, pa.list_(pa.float32())), "vib__b": pa.array(b, pa.list_(pa.float32()))})


@pytest.fixture
def auto_spec():
    from dmafn.spec import parse_spec
    from tests.conftest import tiny_spec_dict

    vib = {"kind": "timeseries", "path": "/tmp/none/vib", "columns": ["a", "b"], "period": "20s", "window": "1min",
           "transform": "auto"}
    return parse_spec(tiny_spec_dict(modalities={"vib": vib}), source="tiny.yaml")


def test_trend_of_two_parts_merges_to_the_trend_of_all_rows():
    from dmafn.features import _Trend

    t = np.arange(40.0)
    x = np.stack([0.5 * t + np.sin(t), np.cos(t)], 1)
    whole = _Trend().add(t, x)
    parts = _Trend().add(t[:13], x[:13]).merge(_Trend().add(t[13:], x[13:]))
    assert np.allclose(whole.drift(), parts.drift())
    assert whole.drift()[0] > 10 and whole.drift()[1] < 1          # a line through noise; noise alone
    assert _Trend().add(t[:5], x[:5]).drift() is None               # too few rows to call a trend


def test_moments_of_a_channel_far_from_zero_keep_its_spread_whatever_the_parts():
    """A level of 1e9 that moves by 1: a variance taken as a difference of raw sums of squares (mean^2 = 1e18
    against a variance of 1) has no digit left - the fitter before gave std 0 (then the 1e-3 floor) here."""
    from dmafn.features import _Moments

    values = 1e9 + np.array([1.0, -1.0, 1.0, -1.0, 1.0, 3.0])
    parts = _Moments().merge(_Moments())                      # an empty part merges to nothing
    for piece in (values[:2], values[2:3], values[3:]):
        mine = _Moments()
        mine.add(piece)
        parts.merge(mine)
    whole = _Moments()
    whole.add(values)
    for m in (parts, whole):
        got = m.result()
        assert got["count"] == 6 and got["mean"][0] == pytest.approx(1e9 + 2 / 3, abs=1e-6)
        assert got["std"][0] == pytest.approx(np.std(values - 1e9), rel=1e-6)
        far, share = m.extreme_share()
        assert far[0] == 1e9 + 3 and share[0] == pytest.approx((3 - 2 / 3) ** 2 / np.sum((values - 1e9 - 2 / 3) ** 2))
    assert _Moments().result() == {"mean": [0.0], "std": [1e-3], "count": 0.0}     # no rows: as before


def test_a_relation_over_predictors_far_from_zero_gets_the_weights_it_gets_near_zero():
    """Two entities whose predictors sit near 1e6 with a spread under 1 (a counter, a pressure in Pa): the
    within-entity cross products are the fleet's centred ones minus the scatter of the entities' means, so the
    weights match the fit of the same rows moved to zero; the fit before subtracted raw sums of squares (~1e12
    per row against ~0.1) and gave (3.74, -2.71) for (3, -2) here."""
    from dmafn.features import _EntityTotals, _Regression, fit_relation

    def fitted(offset):
        rng = np.random.default_rng(0)
        reg = _Regression(2)
        for part in range(6):
            e = part % 2
            load = rng.random(300)
            x = np.column_stack([load, load ** 2]) + offset + 7 * e
            reg.add(f"e{e}", x, 3 * load - 2 * load ** 2 + rng.normal(0, 0.01, 300) + 5 * e)
        # the same fit merged from two halves (entity buckets, shards) as from one stream
        halves = [_Regression(2), _Regression(2)]
        for key, sums in reg.entities.items():
            halves[int(key[1:])].entities[key] = sums
        totals = _EntityTotals.of(halves[0]).merge(_EntityTotals.of(halves[1]))
        return fit_relation(reg, _EntityTotals.of(reg)), fit_relation(reg, totals)

    near, far = fitted(0.0), fitted(1e6)
    for got in (*near, *far):
        assert got["weights"] == pytest.approx(near[0]["weights"], rel=1e-6)
        assert got["residual_std"] == pytest.approx(near[0]["residual_std"], rel=1e-4)
    assert near[0]["weights"] == pytest.approx([3, -2], abs=0.05)


def test_auto_transforms_take_the_median_entity():
    from dmafn.features import auto_transforms

    chosen, drift = auto_transforms([np.array([3.0, 0.1]), np.array([2.0, 0.2]), np.array([0.5, 5.0]), None])
    assert chosen == ["centered", "level"] and drift == [2.0, 0.2]   # one entity's odd channel b is outvoted
    assert auto_transforms([None]) == ([], [])


def test_transform_auto_centers_the_drifting_channel_and_keeps_the_level_of_the_other(auto_spec):
    aligned = _series_rows(auto_spec, level=lambda i: 10.0 + 3.0 * i)            # a rises, b does not
    stats = StatisticsFitter(auto_spec).add(aligned).result()
    entry = stats["modalities"]["vib"]
    assert entry["transform"] == "auto" and entry["channel_transforms"] == ["centered", "level"]
    assert entry["drift"][0] > 1.0 > entry["drift"][1]
    assert entry["global"]["mean"] == pytest.approx([0.0, 5.0], abs=1e-6)       # a's moments are of centred windows
    x = featurize(aligned, auto_spec, stats).inputs["vib"]
    shifted = _series_rows(auto_spec, level=lambda i: 1000.0 + 3.0 * i)
    assert np.allclose(featurize(shifted, auto_spec, stats).inputs["vib"], x)     # a far level: same inputs
    halves = StatisticsFitter(auto_spec).add(aligned.slice(0, 12)).merge(StatisticsFitter(auto_spec).add(aligned.slice(12)))
    assert halves.result()["modalities"]["vib"]["channel_transforms"] == ["centered", "level"]
    flat = StatisticsFitter(auto_spec).add(_series_rows(auto_spec, level=lambda i: 10.0)).result()
    assert flat["modalities"]["vib"]["channel_transforms"] == ["level", "level"]


def test_transform_auto_choice_from_elsewhere_is_checked_and_the_spec_must_keep_auto(auto_spec):
    from dataclasses import replace

    fitter = StatisticsFitter(auto_spec).add(_series_rows(auto_spec, level=lambda i: 10.0 + 3.0 * i))
    assert fitter.result({"vib": ["level", "level"]})["modalities"]["vib"]["channel_transforms"] == ["level", "level"]
    with pytest.raises(ValueError, match=r"modality 'vib': \['level'\] is not one of level/centered per column"):
        fitter.result({"vib": ["level"]})
    level_spec = replace(auto_spec, modalities={"vib": replace(auto_spec.modalities["vib"], transform="level")})
    with pytest.raises(ValueError, match="modality 'vib': the model was trained with transform 'auto'"):
        featurize(_series_rows(auto_spec, level=lambda i: 1.0), level_spec, fitter.result())
    with pytest.raises(ValueError, match="transform 'auto' needs the aligned rows' tick time column '_t'"):
        StatisticsFitter(auto_spec).add(_series_rows(auto_spec, level=lambda i: 1.0).drop([TIME]))


def test_per_channel_transforms_and_an_unresolved_auto():
    windows = np.array([[[1.0, 10.0], [2.0, 10.0], [4.0, 13.0]]], np.float32)
    both = transform_window(windows, ["level", "centered"])
    assert both[0, :, 0].tolist() == [1.0, 2.0, 4.0] and np.allclose(both[0, :, 1], [-1, -1, 2])
    with pytest.raises(ValueError, match="1 channel transforms for 2 channels"):
        transform_window(windows, ["level"])
    with pytest.raises(ValueError, match="'auto' is chosen per channel by the training statistics"):
        transform_window(windows, "auto")


def test_files_with_naive_utc_and_other_time_zones_meet_as_utc(tmp_path, tiny_spec):
    """Each file's event time becomes UTC microseconds before the files meet: naive means UTC, a time zone
    is converted from; files of one date may differ."""
    import datetime as dt

    from pipelines.ingest import read_shard
    from pipelines.storage import Storage

    spec = _proc_spec(tiny_spec, tmp_path)
    noon = 1_704_196_800_000_000                                  # 2024-01-02 12:00 UTC
    rows = lambda ts_type, t: pa.table({"machine_id": ["a"], "ts": pa.array([t], ts_type), "temp": [1.0]})  # noqa
    _write(tmp_path / "date=2024-01-02" / "naive.parquet", rows(pa.timestamp("us"), noon))
    _write(tmp_path / "date=2024-01-02" / "utc.parquet", rows(pa.timestamp("ms", tz="UTC"), noon // 1000 + 60_000))
    _write(tmp_path / "date=2024-01-02" / "berlin.parquet", rows(pa.timestamp("us", tz="Europe/Berlin"),
                                                                  noon + 120_000_000))
    got = read_shard(_shard(tmp_path, spec, [dt.date(2024, 1, 2)]), spec, Storage())
    assert sorted(got.tables["proc"]["_t"].to_list()) == [noon, noon + 60_000_000, noon + 120_000_000]


def _invalid_utf8(values: list[bytes]) -> pa.Array:
    offsets = np.cumsum([0, *[len(v) for v in values]]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()),
                                                           pa.py_buffer(b"".join(values))])


def test_bad_text_undecodable_images_and_misplaced_rows_are_quarantined_with_their_reason(tmp_path, tiny_spec):
    """Invalid UTF-8 in a text column, a PNG header followed by garbage, and a row filed under another date's
    partition are each kept out of the usable rows and counted in quarantine with their own reason."""
    import datetime as dt
    from dataclasses import replace

    from pipelines.ingest import read_shard
    from pipelines.storage import Storage

    day = 1_704_153_600_000_000                                   # 2024-01-02 00:00 UTC
    ts = pa.array([day + 60_000_000, day + 120_000_000, day - 60_000_000], pa.timestamp("us", tz="UTC"))
    mods = {"logs": replace(tiny_spec.modalities["logs"], path=str(tmp_path / "logs")),
            "cam": replace(tiny_spec.modalities["cam"], path=str(tmp_path / "cam"))}
    spec = replace(tiny_spec, modalities=mods)
    _write(tmp_path / "logs" / "date=2024-01-02" / "part-0.parquet",
           pa.table({"machine_id": ["a", "a", "a"], "ts": ts, "msg": _invalid_utf8([b"ok", b"bad \xff\xfe", b"x"])}))
    _write(tmp_path / "cam" / "date=2024-01-02" / "part-0.parquet",
           pa.table({"machine_id": ["a", "a", "a"], "ts": ts,
                     "frame": [png(10), b"\x89PNG\r\n\x1a\n garbage", png(20)]}))
    got = read_shard(_shard(tmp_path, spec, [dt.date(2024, 1, 2)]), spec, Storage())
    assert got.tables["logs"]["msg"].to_list() == ["ok"] and got.tables["cam"].height == 1
    reasons = sorted(got.quarantined.select("source", "reason").rows())
    assert reasons == [("cam", "timed outside its date partition 2024-01-02"),
                       ("cam", "undecodable image in column 'frame'"),
                       ("logs", "invalid UTF-8 in column 'msg'"),
                       ("logs", "timed outside its date partition 2024-01-02")]


def test_frames_kept_as_base64_text_read_as_their_bytes_and_text_that_is_no_base64_is_quarantined(tmp_path, tiny_spec):
    """JSON events landed in Parquet carry a camera's frames as base64 text (plain, or a `data:image/png;base64,`
    URI): read as the bytes they encode, alike to a table of bytes; a text that is no base64 is no image, its row
    quarantined as bytes that are no frame are (before 2026-12-05 such a file failed its date: `column 'frame' is
    string, expected binary`)."""
    import base64
    import datetime as dt
    from dataclasses import replace

    from pipelines.ingest import base64_payloads, read_shard
    from pipelines.storage import Storage

    day = 1_704_153_600_000_000                                   # 2024-01-02 00:00 UTC
    ts = pa.array([day + i * 60_000_000 for i in range(1, 4)], pa.timestamp("us", tz="UTC"))
    spec = replace(tiny_spec, modalities={"cam": replace(tiny_spec.modalities["cam"], path=str(tmp_path / "cam"))})
    texts = [base64.encodebytes(png(10)).decode(), "data:image/png;base64," + base64.b64encode(png(20)).decode(),
             "not base64 at all!"]                                 # MIME's lines; a data URI
    _write(tmp_path / "cam" / "date=2024-01-02" / "part-0.parquet",
           pa.table({"machine_id": ["a", "a", "a"], "ts": ts, "frame": texts}))
    got = read_shard(_shard(tmp_path, spec, [dt.date(2024, 1, 2)]), spec, Storage())
    assert got.tables["cam"].sort("_t")["frame"].to_list() == [png(10), png(20)]
    assert got.quarantined["reason"].to_list() == ["unusable value in column 'frame'"]
    assert base64_payloads(pa.array([None, "AAEC"], pa.large_string())).to_pylist() == [None, b"\x00\x01\x02"]
    assert base64_payloads(pa.array(["AAEC"])).type == pa.binary()
    from pipelines.ingest import decoded_audio, plain_values            # a clip as base64 text: decoded as its WAV

    mic = replace(tiny_spec.modalities["cam"], name="mic", kind="audio", column="wave", sample_rate=16_000)
    wav = _wav(np.sin(np.linspace(0, 20, 1600)), 16_000, 16)
    as_text = pa.table({"wave": [base64.b64encode(wav).decode()]})
    clips, unread = decoded_audio(plain_values(as_text, mic), mic)
    same, _ = decoded_audio(pa.table({"wave": [wav]}), mic)
    assert clips.column("wave").to_pylist() == same.column("wave").to_pylist() and unread.to_list() == [None]


def test_a_payload_files_location_by_its_name():
    """An s3:// URI (Hadoop's s3a:// and s3n:// as one), an absolute path or file:// URI as it is; a relative name
    under payload_root (none without one); another scheme's URI is none."""
    from pipelines.payload_files import payload_location

    root = "s3://lake/frames/"
    assert [payload_location(n, root) for n in ("s3://b/k.png", " s3a://b/k.png", "s3n://b/k.png", "/d/k.png",
                                                "file:///d/k.png", "a/k.png", "gs://b/k.png", "https://h/k.png")] == [
        "s3://b/k.png", "s3://b/k.png", "s3://b/k.png", "/d/k.png", "/d/k.png", "s3://lake/frames/a/k.png", None, None]
    assert payload_location("a/k.png", None) is None and payload_location("a/k.png", "/d") == "/d/a/k.png"


def test_payloads_kept_as_files_are_read_for_the_rows_a_shard_keeps(tmp_path, tiny_spec, monkeypatch):
    """`payload: file`: the camera table names each frame's file - an absolute path, a `file://` URI, a path
    under `payload_root` - and a microphone table each clip's WAV file. A shard reads the files of the rows it keeps
    (a look-back row beyond the tolerance is not read), with the bytes a table storing them would hold; a missing
    file, a file that is no image, an empty name and a relative name without `payload_root` are quarantined with
    reasons naming them. The planner counts the files' bytes (`payload_bytes`), so shards are sized by them."""
    import datetime as dt
    from dataclasses import replace

    from pipelines import payload_files
    from pipelines.check_data import check_data
    from pipelines.ingest import read_shard
    from pipelines.shards import bytes_by_date, list_inputs, list_partition_files
    from pipelines.storage import Storage

    day = 1_704_153_600_000_000                                   # 2024-01-02 00:00 UTC
    minute = 60_000_000
    frames = tmp_path / "frames"
    (frames / "a").mkdir(parents=True)
    for name, data in (("a/1.png", png(10)), ("a/2.png", png(20)), ("a/3.png", png(30)), ("a/old.png", png(40)),
                       ("a/text.png", b"not an image")):
        (frames / name).write_bytes(data)
    cam = replace(tiny_spec.modalities["cam"], path=str(tmp_path / "cam"), payload="file", payload_root=str(frames))
    spec = replace(tiny_spec, modalities={"cam": cam})
    _write(tmp_path / "cam" / "date=2024-01-01" / "part-0.parquet",    # 20 and 2 min before the day: one within reach
           pa.table({"machine_id": ["a", "a"], "ts": pa.array([day - 20 * minute, day - 2 * minute],
                                                              pa.timestamp("us", tz="UTC")),
                     "frame": ["a/old.png", "a/3.png"]}))
    names = ["a/1.png", f"{frames}/a/2.png", f"file://{frames}/a/3.png", "a/missing.png", "a/text.png", " "]
    _write(tmp_path / "cam" / "date=2024-01-02" / "part-0.parquet",
           pa.table({"machine_id": ["a"] * 6, "ts": pa.array([day + i * minute for i in range(1, 7)],
                                                            pa.timestamp("us", tz="UTC")), "frame": names}))
    asked = []
    reader = payload_files.read_payloads
    monkeypatch.setattr(payload_files, "read_payloads", lambda names, *a: asked.extend(names) or reader(names, *a))
    got = read_shard(_shard(tmp_path, spec, [dt.date(2024, 1, 2)]), spec, Storage())
    assert got.tables["cam"].sort("_t")["frame"].to_list() == [png(30), png(10), png(20), png(30)]
    assert "a/old.png" not in asked and sorted(asked).count("a/3.png") == 1
    reasons = sorted(got.quarantined["reason"].to_list())
    assert reasons[0].startswith(f"image file '{frames}/a/missing.png' in column 'frame' cannot be read (")
    assert reasons[1:] == ["undecodable image in column 'frame'", "unusable value in column 'frame'"]
    rootless = replace(spec, modalities={"cam": replace(cam, payload_root=None)})
    got = read_shard(_shard(tmp_path, rootless, [dt.date(2024, 1, 2)]), rootless, Storage())
    assert got.tables["cam"]["frame"].to_list() == [png(20), png(30)]
    assert "image file 'a/1.png' in column 'frame' is a relative path and the modality has no payload_root to read " \
        "it under" in got.quarantined["reason"].to_list()
    # the planner sizes a date by the files its rows name (the sample's mean size times the file's rows)
    listed = [f for f in list_inputs(spec, [dt.date(2024, 1, 2)], Storage()) if f.date == dt.date(2024, 1, 2)]
    (one,) = listed
    sampled = [len(png(v)) for v in (10, 20, 30)] + [len(b"not an image")]
    assert one.payload_bytes == int(one.size * (6 * sum(sampled) / 4 / one.size))
    assert bytes_by_date(listed)[dt.date(2024, 1, 2)] == one.size + one.payload_bytes
    # a listing that only compares what the partitions hold (`status`, `changed_inputs`) looks nothing up
    monkeypatch.setattr("pipelines.shards.sample_listed", lambda *a: pytest.fail("a payload file looked up"))
    assert [f.payload_bytes for f in list_partition_files(spec, [dt.date(2024, 1, 2)], Storage(), sized=False)] == [0]
    monkeypatch.undo()
    # `validate --check-data` looks up a sample of the files: how large they are, which do not exist
    (data,) = check_data(spec, Storage())
    assert any(n.startswith("payload files (payload: file): about ") and f"1 of the 5 looked up do not exist, e.g. "
               f"{frames}/a/missing.png" in n for n in data.notes) and not data.problems

    # a microphone's clips as WAV files: decoded and checked as WAV bytes in the table are
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(1600) / 16_000)
    (frames / "a" / "clip.wav").write_bytes(_wav(tone, 16_000, 16))
    (frames / "a" / "empty.wav").write_bytes(_wav(np.zeros(0), 16_000, 16))
    mic = replace(cam, name="mic", kind="audio", column="wave", path=str(tmp_path / "mic"), sample_rate=16_000,
                  clip_us=100_000)
    _write(tmp_path / "mic" / "date=2024-01-02" / "part-0.parquet",
           pa.table({"machine_id": ["a"] * 3, "ts": pa.array([day + i * minute for i in range(1, 4)],
                                                            pa.timestamp("us", tz="UTC")),
                     "wave": ["a/clip.wav", "a/1.png", "a/empty.wav"]}))
    spec = replace(tiny_spec, modalities={"mic": mic})
    got = read_shard(_shard(tmp_path, spec, [dt.date(2024, 1, 2)]), spec, Storage())
    (clip,) = got.tables["mic"]["wave"].to_list()
    assert np.abs(np.array(clip) - tone).max() < 4e-5
    assert got.payload_formats == {"2024-01-02": {"mic": {"16000 Hz": 1}}}     # the usable file's stored rate
    assert sorted(got.quarantined["reason"].to_list()) == ["undecodable audio in column 'wave'",
                                                           "undecodable audio in column 'wave'"]
    nowhere = replace(spec, modalities={"mic": replace(mic, payload_root=str(tmp_path / "nowhere"))})
    (data,) = check_data(nowhere, Storage())
    assert [p.split(" - ")[0] for p in data.problems] == [
        f"modality 'mic' ({tmp_path}/mic/date=2024-01-02/part-0.parquet): none of the 3 payload files its rows name "
        f"that were looked up exists (the first: {tmp_path}/nowhere/a/clip.wav)"]


def test_partitions_cut_by_local_dates_are_read_by_the_specs_timezone(tmp_path, tiny_spec):
    """A lake partitioned by the plant's own dates: with `timezone` its evening rows (the next UTC date) belong to
    their partition and the look-back partition feeds the first ticks; read as UTC dates they are quarantined as
    timed outside the partition. Every date's input rows are counted beside those quarantined."""
    import datetime as dt
    from dataclasses import replace

    from pipelines.align import date_start_us, day_number
    from pipelines.ingest import read_shard
    from pipelines.storage import Storage

    day, before = dt.date(2024, 1, 2), dt.date(2024, 1, 1)
    start = date_start_us(day, "America/New_York")               # 2024-01-02 05:00 UTC
    h = 3_600_000_000
    for d, times in ((before, [start - 60_000_000]), (day, [start + h, start + 20 * h, start + 23 * h])):
        _write(tmp_path / "proc" / f"date={d}" / "part-0.parquet",
               pa.table({"machine_id": ["a"] * len(times), "ts": pa.array(times, pa.timestamp("us", tz="UTC")),
                         "temp": [1.0] * len(times)}))
    utc = _proc_spec(tiny_spec, tmp_path / "proc")
    local = replace(utc, timezone="America/New_York")
    got = read_shard(_shard(tmp_path, local, [day]), local, Storage())
    assert got.quarantined.is_empty() and got.rows_read == {"2024-01-02": 3}
    assert sorted(got.tables["proc"]["_t"].to_list()) == [start - 60_000_000, start + h, start + 20 * h, start + 23 * h]
    assert got.present["_day"].to_list() == [day_number(day)]
    as_utc = read_shard(_shard(tmp_path, utc, [day]), utc, Storage())  # 20 h and 23 h after the local start: 01-03 UTC
    assert as_utc.quarantined["reason"].to_list() == ["timed outside its date partition 2024-01-02"] * 2
    assert as_utc.rows_read == {"2024-01-02": 3}
    shifted = replace(utc, timezone="Asia/Tokyo")                # read as Tokyo's dates (ending 15:00 UTC): the two
    reasons = read_shard(_shard(tmp_path, shifted, [day]), shifted, Storage()).quarantined["reason"].to_list()
    assert reasons == ["timed outside its date partition 2024-01-02 (Asia/Tokyo)"] * 2   # evening rows again


def test_rows_filed_by_their_arrival_are_read_from_the_next_partition_with_lateness(tmp_path, tiny_spec):
    """A lake partitioned by arrival: 2024-01-03's partition holds the rows of 2024-01-02's last minutes. With
    `lateness: 1h` a shard of 2024-01-02 reads the next partition as look-ahead - only its row groups that can hold
    rows of its dates - and keeps them; the shard of 2024-01-03 finds them in place (not quarantined) and keeps
    them as look-back. Without it they are quarantined there as timed outside the partition, and 2024-01-02 never
    sees them."""
    import datetime as dt
    from dataclasses import replace

    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from pipelines.align import date_start_us
    from pipelines.ingest import read_shard
    from pipelines.parquet_files import open_parquet, row_groups_before
    from pipelines.shards import list_inputs, plan_shards
    from pipelines.storage import Storage

    day, next_day = dt.date(2024, 1, 2), dt.date(2024, 1, 3)
    mid, m = date_start_us(next_day), 60_000_000
    _write(tmp_path / "proc" / f"date={day}" / "part-0.parquet",
           pa.table({"machine_id": ["a"], "ts": pa.array([mid - 600 * m], pa.timestamp("us", tz="UTC")),
                     "temp": [1.0]}))
    late, then = [mid - 3 * m, mid - 2 * m], [mid + 60 * m, mid + 61 * m]      # filed under the next date
    pq.write_table(pa.table({"machine_id": ["a"] * 4, "ts": pa.array(late + then, pa.timestamp("us", tz="UTC")),
                             "temp": [2.0, 3.0, 4.0, 5.0]}), _mkdir(tmp_path / "proc" / f"date={next_day}") /
                   "part-0.parquet", row_group_size=2)
    parquet = open_parquet(pafs.LocalFileSystem(), str(tmp_path / "proc" / f"date={next_day}" / "part-0.parquet"))
    assert row_groups_before(parquet, "ts", mid) == [0]          # the late rows only
    plain = _proc_spec(tiny_spec, tmp_path / "proc")
    late_spec = replace(plain, lateness_us=3_600_000_000)
    (shard,) = plan_shards(late_spec, [day], list_inputs(late_spec, [day], Storage()))
    assert sorted({f.date for f in shard.files}) == [day, next_day] and shard.lookahead_days == 1
    assert shard.alone() == [shard]
    (both_days,) = plan_shards(late_spec, [day, next_day], list_inputs(late_spec, [day, next_day], Storage()))
    first, second = both_days.alone()                            # each alone keeps its look-ahead (and look-back) day
    assert {f.date for f in first.files} == {day, next_day} == {f.date for f in second.files}
    got = read_shard(shard, late_spec, Storage())
    assert sorted(got.tables["proc"]["_t"].to_list()) == [mid - 600 * m, *late] and got.quarantined.is_empty()
    assert got.rows_read == {"2024-01-02": 1}
    following = read_shard(_shard(tmp_path, late_spec, [next_day]), late_spec, Storage())
    assert following.quarantined.is_empty() and sorted(following.tables["proc"]["_t"].to_list()) == late + then
    assert read_shard(_shard(tmp_path, plain, [day]), plain, Storage()).tables["proc"].height == 1
    quarantined = read_shard(_shard(tmp_path, plain, [next_day]), plain, Storage()).quarantined
    assert quarantined["reason"].to_list() == ["timed outside its date partition 2024-01-03"] * 2


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_a_file_whose_pages_are_corrupt_is_named(tmp_path, tiny_spec):
    """The footer reads, the pages do not: a DataError naming the file, not a thrift traceback."""
    import datetime as dt

    from pipelines.ingest import read_shard
    from pipelines.storage import Storage

    spec = _proc_spec(tiny_spec, tmp_path)
    path = tmp_path / "date=2024-01-02" / "part-0.parquet"
    n = 5000
    _write(path, pa.table({"machine_id": ["a"] * n, "ts": pa.array(np.arange(n) + 1_704_153_600_000_000,
                                                                   pa.timestamp("us", tz="UTC")),
                           "temp": np.random.default_rng(0).normal(size=n)}))
    data = bytearray(path.read_bytes())
    data[4:4000] = bytes(np.random.default_rng(1).integers(0, 256, 3996, dtype=np.uint8))   # pages, not footer
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"part-0\.parquet: not a readable Parquet file"):
        read_shard(_shard(tmp_path, spec, [dt.date(2024, 1, 2)]), spec, Storage())


def test_frames_are_counted_by_their_stored_size_and_clips_by_their_rate_read_from_the_header(tmp_path, tiny_spec):
    """`frame_size` reads an image's size from its header (PNG, JPEG), `wav_format` a WAV clip's sample rate, None for
    bytes that are no such file; each distinct frame is opened once, the counts add up over shards, and `read_shard`
    counts its own date's usable clips per stored rate - a clip stored as numbers, which has none, by its length."""
    import datetime as dt
    import io
    from dataclasses import replace

    from PIL import Image

    from dmafn.features import frame_size, wav_format
    from pipelines.ingest import count_payload_formats, frame_formats, merge_counts, read_shard
    from pipelines.storage import Storage

    def encoded(size, kind):
        buf = io.BytesIO()
        Image.new("L" if kind == "PNG" else "RGB", size).save(buf, kind)
        return buf.getvalue()

    small, wide = encoded((16, 16), "PNG"), encoded((64, 48), "JPEG")                  # grey, colour
    assert (frame_size(small), frame_size(wide), frame_size(b"\x89PNG garbage"), frame_size(None)) == (
        "16x16 grey", "64x48", None, None)
    cache = {small: "16x16 grey"}                                       # as undecodable_images left it
    counts = count_payload_formats(frame_formats([small, small, wide, b"junk"], cache), {})    # a grey modality's
    assert counts == {"16x16": 2, "64x48 colour": 1} and cache == {small: "16x16 grey", wide: "64x48", b"junk": None}
    assert frame_formats([small, wide], cache, colour=True) == ["16x16 grey", "64x48"]    # a colour modality's
    deep = io.BytesIO()
    Image.new("I;16", (8, 8)).save(deep, "PNG")
    assert frame_size(deep.getvalue()) == "8x8 grey"
    assert merge_counts({"cam": dict(counts)}, {"cam": {"16x16": 1}, "cam2": {"8x8": 3}}) == {
        "cam": {"16x16": 3, "64x48 colour": 1}, "cam2": {"8x8": 3}}
    slow, fast = _wav(np.sin(np.linspace(0, 20, 800)), 8_000, 16), _wav(np.sin(np.linspace(0, 20, 1600)), 16_000, 16)
    assert (wav_format(slow), wav_format(_wav(np.zeros(10), 44_100, 24, 2, extensible=True)), wav_format(b"RIFF"),
            wav_format(None)) == ("8000 Hz", "44100 Hz", None, None)
    mic = replace(tiny_spec.modalities["cam"], name="mic", kind="audio", column="wave", sample_rate=16_000,
                  path=str(tmp_path / "mic"))
    spec = replace(tiny_spec, modalities={"mic": mic})
    day = 1_704_153_600_000_000                                   # 2024-01-02 00:00 UTC
    _write(tmp_path / "mic" / "date=2024-01-02" / "part-0.parquet",
           pa.table({"machine_id": ["a"] * 4, "ts": pa.array([day + i * 60_000_000 for i in range(1, 5)],
                                                               pa.timestamp("us", tz="UTC")),
                     "wave": [fast, fast, slow, b"RIFF....WAVEjunk"]}))
    got = read_shard(_shard(tmp_path, spec, [dt.date(2024, 1, 2)]), spec, Storage())
    assert got.payload_formats == {"2024-01-02": {"mic": {"16000 Hz": 2, "8000 Hz": 1}}}     # the junk quarantined
    assert got.quarantined.height == 1 and "_format" not in got.tables["mic"].columns
    as_lists = tmp_path / "mic" / "date=2024-01-02" / "part-0.parquet"    # clips as lists: their lengths counted
    _write(as_lists, pa.table({"machine_id": ["a"] * 5, "ts": pa.array([day + i * 60_000_000 for i in range(1, 6)],
                                                                      pa.timestamp("us", tz="UTC")),
                               "wave": pa.array([[0.1] * 1600, [0.2] * 1600, [0.3] * 800, [], None],
                                                pa.list_(pa.float32()))}))
    got = read_shard(_shard(tmp_path, spec, [dt.date(2024, 1, 2)]), spec, Storage())
    assert got.payload_formats == {"2024-01-02": {"mic": {"1600 samples": 2, "800 samples": 1}}}   # usable ones
    assert got.quarantined.height == 2 and "_format" not in got.tables["mic"].columns
    cam = replace(tiny_spec.modalities["cam"], path=str(tmp_path / "cam"))      # a grey frame and a colour one
    _write(tmp_path / "cam" / "date=2024-01-02" / "part-0.parquet",
           pa.table({"machine_id": ["a", "a"], "ts": pa.array([day + 60_000_000, day + 120_000_000],
                                                               pa.timestamp("us", tz="UTC")), "frame": [small, wide]}))
    for channels, formats in ((1, {"16x16": 1, "64x48 colour": 1}), (3, {"16x16 grey": 1, "64x48": 1})):
        colour = replace(tiny_spec, modalities={"cam": replace(cam, channels=channels)})
        got = read_shard(_shard(tmp_path, colour, [dt.date(2024, 1, 2)]), colour, Storage())
        assert got.payload_formats == {"2024-01-02": {"cam": formats}}      # each names the frames of the other kind


def test_a_page_damaged_in_storage_fails_its_checksum_and_names_the_row_group_and_column(tmp_path, tiny_spec):
    """A writer's page checksums (parquet-java's default) are verified: bytes flipped inside a page that still decodes
    (a dictionary of doubles) would be read as other numbers; the read fails naming file, row group and column."""
    import datetime as dt

    import pyarrow.parquet as pq

    from pipelines.ingest import read_shard
    from pipelines.storage import Storage

    spec = _proc_spec(tiny_spec, tmp_path)
    path = tmp_path / "date=2024-01-02" / "part-0.parquet"
    n = 2000
    table = pa.table({"machine_id": ["a"] * n, "ts": pa.array(np.arange(n) * 1_000_000 + 1_704_153_600_000_000,
                                                              pa.timestamp("us", tz="UTC")),
                      "temp": np.random.default_rng(0).normal(size=n)})
    path.parent.mkdir(parents=True)
    pq.write_table(table, path, write_page_checksum=True, compression="none")
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(2)
    assert chunk.path_in_schema == "temp"
    data = bytearray(path.read_bytes())
    start = (chunk.dictionary_page_offset or chunk.data_page_offset) + 100
    data[start:start + 8] = bytes(b ^ 0x5A for b in data[start:start + 8])     # inside temp's values
    path.write_bytes(bytes(data))
    unverified = pq.ParquetFile(path).read()["temp"].to_numpy()
    assert unverified.shape == (n,) and (unverified != table["temp"].to_numpy()).any()   # silently other numbers
    with pytest.raises(DataError, match=r"part-0\.parquet: not a readable Parquet file \(row group 0, column 'temp': "
                                        r".*checksum"):
        read_shard(_shard(tmp_path, spec, [dt.date(2024, 1, 2)]), spec, Storage())

def test_log_templates_mask_numbers_and_ids_and_novelty_counts_unseen_lines_and_tokens():
    from dmafn.features import TextVocabulary, line_template

    assert line_template("Pump 7 pressure=3.2bar id=ab12f OK") == "pump <*> <*> <*> ok"
    counts = TextVocabulary.count(["pump 1 ok", "pump 2 ok", "valve open"])
    counts = TextVocabulary.count(["pump 3 ok"], counts)                 # partial counts add up
    assert counts == {"pump <*> ok": 3, "valve open": 1}
    vocab = TextVocabulary.fit(counts)
    assert vocab.novelty(["pump 9 ok", "valve open"]) == (0, 0)
    assert vocab.novelty(["valve open pump"]) == (1, 0)                   # new template of known words
    assert vocab.novelty(["seal breach 4 detected", "pump 1 ok"]) == (1, 3)
    assert vocab.novelty(None) == (0, 0)
    assert TextVocabulary.fit(counts, cap=1).templates == {"pump <*> ok"}
    from dmafn.features import prune_counts

    many = {f"line {chr(97 + i % 26)}{chr(97 + i // 26)}": 1 + (i < 3) for i in range(9)}
    assert prune_counts(many, cap=3) == many                        # up to 4 x cap: kept whole
    many.update({f"more {chr(97 + i)}": 1 for i in range(4)})
    assert prune_counts(many, cap=3) == {"line aa": 2, "line ba": 2, "line ca": 2, "line da": 1, "line ea": 1,
                                         "line fa": 1}              # past it: the 2 x cap most frequent


def test_statistics_fit_a_text_vocabulary_and_featurize_adds_the_windows_novelty(tiny_spec):
    import torch
    from dmafn.encoders import TextEncoder
    from dmafn.features import NOVEL_LINE_CHARS, TextVocabulary

    aligned = aligned_rows(tiny_spec)
    fitter = StatisticsFitter(tiny_spec).add(aligned)
    stats = StatisticsFitter(tiny_spec).merge(fitter).result()         # merged partials give the same vocabulary
    assert stats["modalities"]["logs"]["vocabulary"] == {"templates": ["error pump <*> failed"],
                                                         "tokens": ["error", "failed", "pump"]}
    seen = featurize(aligned, tiny_spec, stats)
    x = seen.inputs["logs"]
    assert x.shape == (aligned.num_rows, 66) and not x[:, 64:].any()
    assert (seen.novel_lines["logs"] == None).all()                      # noqa: E711 - every line's template seen
    novel = aligned.set_column(aligned.schema.get_field_index("logs__msg"), "logs__msg",
                               pa.array([["seal breach 4 detected", "ERROR pump 8 failed"]] * aligned.num_rows,
                                        pa.list_(pa.string())))
    feats = featurize(novel, tiny_spec, stats)
    x, present = feats.inputs["logs"], feats.mask[:, feats.modalities.index("logs")]
    assert present.any() and (x[present, 64:] == [1, 3]).all() and not x[~present].any()
    # the window's latest line whose template was never seen, as its template: what `channel_logs` names
    lines = feats.novel_lines["logs"]
    assert (lines[present] == "seal breach <*> detected").all() and (lines[~present] == None).all()   # noqa: E711
    assert list(feats.rows(np.flatnonzero(present)[:2]).novel_lines["logs"]) == ["seal breach <*> detected"] * 2
    vocab, long_line = TextVocabulary(["a <*>"]), "b " + "x" * 500
    assert vocab.window_novelty([long_line, "c 1", "a 2"]) == (2, 3, "c <*>")     # the latest unseen line, in one pass
    assert vocab.window_novelty([long_line, "a 2"])[2] == long_line[:NOVEL_LINE_CHARS]
    enc = TextEncoder(8, "transformer", 64, novelty=True)
    target = enc.target(torch.as_tensor(x))
    assert target.shape == (len(x), 66)
    assert torch.allclose(target[torch.as_tensor(present), 64:], torch.log1p(torch.tensor([1.0, 3.0])))
    assert enc(torch.as_tensor(x)).shape == (len(x), 8)                  # the encoder reads the token ids only
    assert TextEncoder(8, "bag", 64).target(torch.as_tensor(x)).shape == (len(x), 64)   # older versions: no novelty
    with pytest.raises(ValueError, match="expects novelty columns"):
        enc.target(torch.as_tensor(x[:, :64]))


def test_a_context_view_reads_the_same_rows_as_a_coarse_window_with_an_hour_of_look_back(tmp_path):
    """`context: {window: 1h}` on a tabular modality: its rows of the last hour, one mean per minute, as the
    modality `proc_context` beside `proc` - the look-back day's last hour included."""
    import datetime as dt

    from dmafn.spec import parse_spec
    from pipelines.align import data_ticks
    from pipelines.ingest import read_shard
    from pipelines.storage import Storage
    from tests.conftest import tiny_spec_dict

    data = tiny_spec_dict()
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "path": str(tmp_path), "context": {"window": "1h"}}}
    spec = parse_spec(data)
    day = 1_704_153_600_000_000                                   # 2024-01-02 00:00 UTC
    minutes = [-90, -30, -1, 0, 1]                                # the look-back day's rows, then the date's
    for date, part in (("2024-01-01", minutes[:3]), ("2024-01-02", minutes[3:])):
        ts = pa.array([day + m * M for m in part], pa.timestamp("us", tz="UTC"))
        _write(tmp_path / f"date={date}" / "part-0.parquet",
               pa.table({"machine_id": ["a"] * len(part), "ts": ts, "temp": [float(m) for m in part]}))
    _write(tmp_path / "date=2024-01-02" / "part-1.parquet",       # a bad row: quarantined once, not per view
           pa.table({"machine_id": ["a"], "ts": pa.array([day + 5 * M], pa.timestamp("us", tz="UTC")),
                     "temp": [float("nan")]}))
    inputs = read_shard(_shard(tmp_path, spec, [dt.date(2024, 1, 2)]), spec, Storage())
    assert inputs.quarantined.select("source", "reason").rows() == [("proc", "unusable value in column 'temp'")]
    assert inputs.tables["proc"]["_t"].to_list() == [day - M, day, day + M]            # 2 min tolerance
    assert sorted(inputs.tables["proc_context"]["_t"].to_list()) == [day + m * M for m in minutes[1:]]  # 1 h
    ticks = data_ticks(inputs.tables, inputs.present, spec, [dt.date(2024, 1, 2)])
    aligned = align(ticks.head(2), inputs.tables, spec)
    window = aligned.sort(TIME)["proc_context__temp"].to_list()
    assert len(window[0]) == 60 and window[0][-1] == 0.0 and window[0][-2] == -1.0 and window[0][30] == -30.0
    assert window[1][-1] == 1.0


def _relation_spec():
    """`proc` with two channels (temp, pres) and a 10-minute context: a spec whose context fits relations."""
    from dmafn.spec import parse_spec
    from tests.conftest import tiny_spec_dict

    data = tiny_spec_dict()
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "columns": ["temp", "pres"],
                                   "context": {"window": "10min"}}}
    return parse_spec(data)


def _relation_rows(spec, n, rng, offsets, drift=0.0):
    """Aligned rows of `proc` (temp, pres) and its 10-minute context: temp follows the mean of the last three
    minutes of pressure (a lagged response) plus each entity's own offset; `drift` is added to temp now."""
    steps = spec.modalities["proc_context"].steps
    history = rng.normal(0, 1, (n, steps))                                    # per-minute pressure means
    pres = history[:, -1]
    temp_hist = np.zeros((n, steps))
    keys = [list(offsets)[i % len(offsets)] for i in range(n)]
    base = np.array([offsets[k] for k in keys])
    temp = 2 * history[:, -3:].mean(1) + base + rng.normal(0, 0.05, n) + drift
    temp_hist[:] = temp[:, None]                     # its own history says it was always here: never used
    return pa.table({"machine_id": keys, "proc__present": [True] * n, "proc__temp": temp, "proc__pres": pres,
                     "proc_context__present": [True] * n,
                     "proc_context__temp": pa.array(temp_hist.astype(np.float32).tolist(), pa.list_(pa.float32())),
                     "proc_context__pres": pa.array(history.astype(np.float32).tolist(), pa.list_(pa.float32()))})


def test_each_channels_regression_taken_from_the_shared_quantities_is_the_one_fitted_on_its_design_alone():
    """`_RelationFit` keeps one accumulator over every quantity (P x P) instead of one per channel (C of them, each
    nearly P x P): a channel's regression taken from it (`channel`, `_EntityTotals.channel`) has the moments, entity
    sums and fitted relation of a `_Regression` fed that channel's design and target alone."""
    from dmafn.features import _EntityTotals, _Regression, _RelationFit, fit_relation, relation_design

    rng = np.random.default_rng(3)
    fit, alone = _RelationFit(), None
    for part in range(3):                                   # three batches, two entities
        keys = np.array(["a", "b"] * 40)
        current = rng.normal(size=(80, 4)) + (keys == "b")[:, None] * 3
        history = current[:, None, :] + rng.normal(0, 0.1, size=(80, 12, 4))
        peers = rng.normal(size=(80, 2))
        fit.add(current, history, keys, peers)
        alone = alone or [_Regression(relation_design(current, history, c, peers).shape[1]) for c in range(4)]
        for c, reg in enumerate(alone):
            for key in ("a", "b"):
                rows = keys == key
                reg.add(key, relation_design(current[rows], history[rows], c, peers[rows]), current[rows, c])
    totals = _EntityTotals.of(fit.quantities)
    for c, reg in enumerate(alone):
        taken = fit.channel(c)
        np.testing.assert_allclose(taken.moments.scatter, reg.moments.scatter, rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(taken.moments.mean, reg.moments.mean, rtol=1e-12)
        assert taken.moments.n == reg.moments.n and taken.entities["b"].n == reg.entities["b"].n
        np.testing.assert_allclose(taken.entities["b"].sx, reg.entities["b"].sx, rtol=1e-12)
        assert taken.entities["b"].sy == pytest.approx(reg.entities["b"].sy, rel=1e-12)
        got = fit_relation(taken, totals.channel(fit.design(c), c))
        want = fit_relation(reg, _EntityTotals.of(reg))
        np.testing.assert_allclose(got["weights"], want["weights"], rtol=1e-8, atol=1e-10)
        assert got["residual_std"] == pytest.approx(want["residual_std"], rel=1e-9)


def test_a_channel_that_leaves_its_relation_with_the_others_gets_a_relation_error():
    """A context view fits, per channel of its parent, a least-squares relation to the other channels (now and
    over the window) with an intercept per entity; shards merge exactly; on new rows a channel where its
    relation puts it errs ~1, a channel moved away from it errs far more, and its own history never explains it."""
    from dmafn.features import relation_blocks, relation_design

    assert relation_blocks(60) == [(0, 1), (1, 3), (3, 10), (10, 30), (30, 60)]
    assert relation_blocks(5) == [(0, 1), (1, 3), (3, 5)]
    spec = _relation_spec()
    rng = np.random.default_rng(0)
    offsets = {"a": 0.0, "b": 5.0}
    train = _relation_rows(spec, 600, rng, offsets)
    whole = StatisticsFitter(spec).add(train).result()
    second = StatisticsFitter(spec).add(train.slice(300))
    first = StatisticsFitter(spec).merge(second).add(train.slice(0, 300))     # merged into an empty one, then added
    assert second.relations_["proc_context"].quantities.entities["a"].n == 150   # merging copied, `second` unchanged
    halves = first.result()
    temp = whole["relations"]["proc_context"]["channels"][0]
    np.testing.assert_allclose(temp["weights"], halves["relations"]["proc_context"]["channels"][0]["weights"],
                               atol=1e-9)
    assert temp["entity_intercepts"]["b"] - temp["entity_intercepts"]["a"] == pytest.approx(5.0, abs=0.05)
    assert temp["residual_std"] == pytest.approx(0.05, rel=0.2)

    normal = featurize(_relation_rows(spec, 200, rng, offsets), spec, whole)
    moved = featurize(_relation_rows(spec, 200, rng, offsets, drift=0.5), spec, whole)
    proc = normal.modalities.index("proc")
    assert normal.relation_errors[:, proc].mean() < 3
    assert moved.relation_errors[:, proc].mean() > 20 * normal.relation_errors[:, proc].mean()
    assert (normal.relation_errors[:, normal.modalities.index("proc_context")] == 0).all()
    for f in (normal, moved):               # each channel's part (`relation_channels`) adds up to the error
        np.testing.assert_allclose(f.relation_channels["proc"].sum(1), f.relation_errors[:, proc], rtol=1e-5)
    parts = moved.relation_channels["proc"]
    assert (parts[:, 0] > parts[:, 1]).mean() > 0.9         # the moved channel's part is the larger
    current, history = np.array([[1.0, 2.0]]), np.ones((1, 10, 2))
    changed = history.copy()
    changed[..., 0] = 99.0                                   # the target's own history: not in its design
    np.testing.assert_array_equal(relation_design(current, history, 0), relation_design(current, changed, 0))
    assert normal.rows(np.arange(3)).relation_errors.shape == (3, 2)


def test_relations_are_refitted_without_an_incident_left_in_the_training_window():
    """An overheat inside the training window (3 % of its ticks 30 away from the relation) sets a least-squares
    fit's residual std, so every later error is counted in its units and a drift hides; the refit on the ticks
    within `RELATION_TRIM_LIMIT` of the fit before leaves those ticks out (counted) and gives the clean fit back.
    On clean rows nothing is left out and the statistics are the first fit's."""
    from dmafn.features import (fit_training_statistics, relation_lines, relation_outliers, relation_warnings,
                                relations_left_out, validation_warnings)

    spec = _relation_spec()
    rng = np.random.default_rng(2)
    offsets = {"a": 0.0, "b": 5.0}
    clean = _relation_rows(spec, 600, rng, offsets)
    hot = np.zeros(600)
    hot[100:118] = 30.0                                   # 18 ticks of pump "a" (every other row) overheating
    temp = clean.column("proc__temp").to_numpy() + hot
    incident = clean.set_column(clean.schema.get_field_index("proc__temp"), "proc__temp", pa.array(temp))

    once = StatisticsFitter(spec).add(incident).result()
    robust = fit_training_statistics(spec, incident)
    fitted, refitted = once["relations"]["proc_context"], robust["relations"]["proc_context"]
    assert fitted["channels"][0]["residual_std"] > 2.0            # the incident's spread, not the relation's
    assert refitted["channels"][0]["residual_std"] == pytest.approx(0.05, rel=0.2)
    assert refitted["left_out"] == 18 and relations_left_out(robust) == 18 and "left_out" not in fitted
    intercepts = refitted["channels"][0]["entity_intercepts"]
    assert intercepts["b"] - intercepts["a"] == pytest.approx(5.0, abs=0.05)
    assert any("18 left out" in line for line in relation_lines(robust, spec))
    (warning,) = relation_warnings(robust, 600)                   # 3 % of the training ticks: incidents, likely
    assert warning.startswith("modality 'proc': its relations' refit left out 18 of 600 training ticks (3.0%")

    moved = _relation_rows(spec, 200, rng, offsets, drift=0.5)    # a drift of 10 residual stds
    proc = list(spec.modalities).index("proc")
    under_once = featurize(moved, spec, once).relation_errors[:, proc].mean()
    under_refit = featurize(moved, spec, robust).relation_errors[:, proc].mean()
    assert under_once < 1 < 20 < under_refit                      # hidden under the incident's spread; then seen
    drifted, usual = featurize(moved, spec, robust), featurize(_relation_rows(spec, 200, rng, offsets), spec, robust)
    assert relation_outliers(drifted) > 150 and relation_outliers(usual) <= 1     # validation ticks off their relations
    assert validation_warnings(relation_outliers(usual), 200) == []
    (line,) = validation_warnings(relation_outliers(drifted), 200)
    assert "validation ticks" in line and "likely hold incidents nobody labelled" in line

    plain, refit = StatisticsFitter(spec).add(clean).result(), fit_training_statistics(spec, clean)
    assert refit["relations"]["proc_context"]["left_out"] == 0 and relation_warnings(refit, 600) == []
    np.testing.assert_array_equal(plain["relations"]["proc_context"]["channels"][0]["weights"],
                                  refit["relations"]["proc_context"]["channels"][0]["weights"])


def _cross_rows(spec, n, rng, shift=0.0, vib_present=True, spread=1.0, swing=False):
    """Aligned rows of `proc` (temp, pres, 10-minute context) and `vib` (a 3-step window) driven by one load: pres
    follows it now, temp the last three minutes of pres, vib's window its level plus fast noise. `shift` moves the
    process side (pres and its history, so temp too) to another load while vib keeps the true one; `spread`: the
    load's std (new rows keep inside the training range, so no predictor is held at its edge); `swing`: vib's
    window swings about zero by 2 + the load instead (an accelerometer's axis: its mean says nothing)."""
    steps = spec.modalities["proc_context"].steps
    load = rng.normal(0, spread, (n, steps))                                    # per-minute load
    history = load + shift + rng.normal(0, 0.05, (n, steps))                    # pressure's per-minute means
    temp = 2 * history[:, -3:].mean(1) + rng.normal(0, 0.05, n)
    vib = (2 + load[:, -1:]) * np.array([[1.0, -1.0, 0.0]]) + rng.normal(0, 0.05, (n, 3)) if swing else \
        load[:, -1:] + rng.normal(0, 0.2, (n, 3))
    return pa.table({"machine_id": ["a"] * n, "proc__present": [True] * n, "proc__temp": temp,
                     "proc__pres": history[:, -1], "proc_context__present": [True] * n,
                     "proc_context__temp": pa.array(np.repeat(temp[:, None], steps, 1).astype(np.float32).tolist(),
                                                    pa.list_(pa.float32())),
                     "proc_context__pres": pa.array(history.astype(np.float32).tolist(), pa.list_(pa.float32())),
                     "vib__present": [vib_present] * n,
                     "vib__a": pa.array(vib.astype(np.float32).tolist() if vib_present else [None] * n,
                                        pa.list_(pa.float32()))})


def _cross_fitted(seed: int):
    """The spec of `proc` (temp, pres, a 10-minute context) and `vib`, its statistics fitted on 800 `_cross_rows`, and
    the random generator drawn from after them."""
    from dmafn.spec import parse_spec
    from tests.conftest import tiny_spec_dict

    data = tiny_spec_dict()
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "columns": ["temp", "pres"],
                                   "context": {"window": "10min"}}, "vib": data["modalities"]["vib"]}
    spec = parse_spec(data)
    rng = np.random.default_rng(seed)
    return spec, StatisticsFitter(spec).add(_cross_rows(spec, 800, rng)).result(), rng


def test_a_cross_modal_relation_scores_a_process_that_agrees_with_itself_but_not_with_its_peers():
    """A context's relations are fitted a second time with the peer modalities' current values beside (a series
    window's mean and its swing): a process side that follows another load than the vibration - each channel still where the
    other puts it - errs far from its cross-modal relation; where the peer is absent the within-modality relation
    scores it (and misses it); shards merge exactly."""
    from dmafn.features import peer_values, relation_peers
    from dmafn.spec import parse_spec
    from tests.conftest import tiny_spec_dict

    data = tiny_spec_dict()
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "columns": ["temp", "pres"],
                                   "context": {"window": "10min"}}, "vib": data["modalities"]["vib"]}
    spec = parse_spec(data)
    assert relation_peers(spec, "proc") == ["vib"]
    rng = np.random.default_rng(4)
    train = _cross_rows(spec, 800, rng)
    whole = StatisticsFitter(spec).add(train).result()
    halves = StatisticsFitter(spec).add(train.slice(0, 400)).merge(
        StatisticsFitter(spec).add(train.slice(400))).result()
    fitted = whole["relations"]["proc_context"]
    assert fitted["peers"] == ["vib"]
    assert len(fitted["cross_channels"][1]["weights"]) == 1 + 3 + 2         # temp now, 3 blocks, vib's mean, swing
    assert fitted["peer_spread"] is True
    np.testing.assert_allclose(fitted["cross_channels"][1]["weights"],
                               halves["relations"]["proc_context"]["cross_channels"][1]["weights"], atol=1e-9)

    levels = {"vib": np.array([[[1.0], [2.0], [6.0]]], np.float32)}
    values, present = peer_values(levels, {"vib": np.array([True])}, spec, ["vib"])
    np.testing.assert_allclose(values, [[3.0]]) and present.tolist() == [True]      # the window's mean
    values, _ = peer_values(levels, {"vib": np.array([True])}, spec, ["vib"], spread=True)
    np.testing.assert_allclose(values, [[3.0, np.std([1.0, 2.0, 6.0])]])             # and how far it swings

    proc = list(spec.modalities).index("proc")
    def errors(stats, **kw):
        return featurize(_cross_rows(spec, 200, rng, spread=0.4, **kw), spec, stats).relation_errors[:, proc]

    normal, shifted, blind = errors(whole), errors(whole, shift=1.2), errors(whole, shift=1.2, vib_present=False)
    assert normal.mean() < 3 and shifted.mean() > 20 * normal.mean()
    assert blind.mean() < 3                     # without the peer only the process's own relation: it agrees
    within = {**whole, "relations": {"proc_context": {k: v for k, v in fitted.items()
                                                      if k not in ("peers", "cross_channels")}}}
    assert errors(within, shift=1.2).mean() < 3
    from dmafn.features import relation_lines

    temp_line, pres_line = relation_lines(whole, spec)                       # what `dmafn train` logs
    assert temp_line.startswith("modality 'proc', column 'temp': relation residual within the modality ")
    within_share, across_share = (int(part.split("(")[1].split("%")[0]) for part in pres_line.split(";"))
    assert "; across to vib " in pres_line and across_share < 20 < 60 < within_share    # vib explains pres
    off = parse_spec({**data, "model": {"cross_modal_relations": False}})        # a spec can turn them off
    assert relation_peers(off, "proc") == [] and "cross_channels" not in \
        StatisticsFitter(off).add(train).result()["relations"]["proc_context"]


def test_a_modality_read_as_absent_is_out_of_the_relations_that_read_it_and_the_state_as_where_its_rows_are_missing():
    """`featurize(..., absent=...)` (the cause's views): the modality out of the mask, its inputs zeros, the relations
    that read it as a peer on their within-modality fits and its state columns NaN - the same features as where its
    rows are missing, the other modalities' inputs as they were; `relation_peers_read` names the modalities some
    fitted relation reads."""
    from dmafn.features import relation_peers_read
    spec, stats, rng = _cross_fitted(4)
    assert relation_peers_read(stats) == {"vib"}
    assert relation_peers_read({**stats, "relations": {}}) == set()
    rows = _cross_rows(spec, 200, rng, spread=0.4, shift=1.2)          # the process side off its relation with vib
    gone = rows.set_column(rows.schema.get_field_index("vib__present"), "vib__present", pa.array([False] * 200))
    seen, hidden, missing = (featurize(rows, spec, stats), featurize(rows, spec, stats, absent=("vib",)),
                             featurize(gone, spec, stats))
    proc, vib = list(spec.modalities).index("proc"), list(spec.modalities).index("vib")
    assert seen.relation_errors[:, proc].mean() > 20 * hidden.relation_errors[:, proc].mean()
    np.testing.assert_array_equal(hidden.relation_errors, missing.relation_errors)
    np.testing.assert_array_equal(hidden.mask, missing.mask)
    assert seen.mask[:, vib].all() and not hidden.mask[:, vib].any() and not hidden.inputs["vib"].any()
    np.testing.assert_array_equal(hidden.inputs["proc"], seen.inputs["proc"])
    assert hidden.state_owners == seen.state_owners and "vib" in seen.state_owners
    np.testing.assert_array_equal(hidden.state, missing.state)
    owned = np.asarray(hidden.state_owners) == "vib"
    assert np.isnan(hidden.state[:, owned]).all() and np.isfinite(seen.state[:, owned]).all()


def test_a_peer_that_swings_about_zero_tells_its_load_through_its_window_spread():
    """An accelerometer's axis swings about zero whatever the load: its window mean says nothing, how far it swings
    (`window_spread`) does. With `model.window_spread` (the default) the cross-modal relation reads both, so a
    process that follows another load than the vibration errs far from it, and the operating state reads the
    swing; with `window_spread: false` (a window's mean only, as versions before it) the same shift passes
    unseen. A version fitted without it keeps its layout under a spec that has it."""
    from dmafn.features import window_spread
    from dmafn.spec import parse_spec
    from tests.conftest import tiny_spec_dict

    data = tiny_spec_dict()
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "columns": ["temp", "pres"],
                                   "context": {"window": "10min"}}, "vib": data["modalities"]["vib"]}
    spec, off = parse_spec(data), parse_spec({**data, "model": {"window_spread": False}})
    assert spec.model.window_spread and not off.model.window_spread
    np.testing.assert_allclose(window_spread(np.array([[[1.0], [-1.0], [0.0]]])), [[np.sqrt(2 / 3)]])
    rng = np.random.default_rng(8)
    train = _cross_rows(spec, 800, rng, swing=True)
    with_swing, means_only = StatisticsFitter(spec).add(train).result(), StatisticsFitter(off).add(train).result()
    assert with_swing["relations"]["proc_context"]["peer_spread"] is True
    assert means_only["relations"]["proc_context"]["peer_spread"] is False and "spread" not in means_only["modalities"]["vib"]
    proc = list(spec.modalities).index("proc")

    def errors(stats, run_spec, **kw):
        return featurize(_cross_rows(spec, 200, rng, spread=0.4, swing=True, **kw), run_spec, stats).relation_errors[:, proc]

    normal = errors(with_swing, spec)
    assert normal.mean() < 3 and errors(with_swing, spec, shift=1.2).mean() > 20 * normal.mean()
    assert errors(means_only, off, shift=1.2).mean() < 3              # the mean alone cannot see the vibration's load
    assert errors(means_only, spec, shift=1.2).mean() < 3             # the version's own layout, whatever the spec says

    rows = _cross_rows(spec, 200, rng, spread=0.4, swing=True)
    state = featurize(rows, spec, with_swing)
    assert state.state_owners[:4] == ("proc", "proc", "vib", "vib")        # temp, pres, vib's mean, vib's swing
    pres, mean, swing = state.state[:, 1], state.state[:, 2], state.state[:, 3]
    assert np.corrcoef(pres, swing)[0, 1] > 0.9 and abs(np.corrcoef(pres, mean)[0, 1]) < 0.3
    assert featurize(rows, spec, means_only).state_owners[:3] == ("proc", "proc", "vib")
    assert featurize(rows, spec, means_only).state_owners[3:] == ("proc.rising", "vib.rising")


def _one_channel_rows(spec, n, rng, shift=0.0, vib_present=True):
    """Aligned rows of a one-channel `proc` (temp, with a 10-minute context) and `vib` (a 3-step window), both
    following one load: temp = 2 x load (+ `shift`), vib's window the load plus fast noise."""
    steps = spec.modalities["proc_context"].steps
    load = rng.normal(0, 1, n)
    temp = 2 * load + shift + rng.normal(0, 0.05, n)
    vib = load[:, None] + rng.normal(0, 0.2, (n, 3))
    return pa.table({"machine_id": ["a", "b"] * (n // 2), "proc__present": [True] * n, "proc__temp": temp,
                     "proc_context__present": [True] * n,
                     "proc_context__temp": pa.array(np.repeat(temp[:, None], steps, 1).astype(np.float32).tolist(),
                                                    pa.list_(pa.float32())),
                     "vib__present": [vib_present] * n,
                     "vib__a": pa.array(vib.astype(np.float32).tolist() if vib_present else [None] * n,
                                        pa.list_(pa.float32()))})


def test_a_one_channel_modality_gets_a_relation_across_to_its_peers_and_keeps_its_context_as_input():
    """A modality of one channel has no other to be related to within it, but with peers it gets a cross-modal
    relation (its peers' current values only): a temperature away from where the vibration's load puts it errs
    far more than a normal one, a tick without the peer gets no relation error, the context stays a model input
    (no relation reads its hour), and the bucketed fit gives the same; without peers there is no relation."""
    from dmafn.features import relation_lines, relation_pairs
    from dmafn.spec import parse_spec
    from tests.conftest import tiny_spec_dict

    data = tiny_spec_dict()
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "context": {"window": "10min"}},
                          "vib": data["modalities"]["vib"]}
    spec = parse_spec(data)
    assert spec.modalities["proc"].columns == ("temp",) and relation_pairs(spec) == {"proc_context": "proc"}
    rng = np.random.default_rng(6)
    fitter = StatisticsFitter(spec).add(_one_channel_rows(spec, 600, rng))
    stats = fitter.result()
    fitted = stats["relations"]["proc_context"]
    assert fitted["channels"] == [None] and fitted["ranges"] is None and fitted["model_input"] is True
    assert fitted["peers"] == ["vib"] and len(fitted["cross_channels"][0]["weights"]) == 2   # vib's mean and swing
    assert set(fitted["cross_channels"][0]["entity_intercepts"]) == {"a", "b"}
    same_statistics(stats, _fit_in_buckets(fitter, 2)[2])
    proc = list(spec.modalities).index("proc")

    def features(**kw):
        return featurize(_one_channel_rows(spec, 200, rng, **kw), spec, stats)

    normal, shifted, blind = features(), features(shift=1.5), features(shift=1.5, vib_present=False)
    assert normal.relation_errors[:, proc].mean() < 3
    assert shifted.relation_errors[:, proc].mean() > 20 * normal.relation_errors[:, proc].mean()
    assert (blind.relation_errors[:, proc] == 0).all()
    assert normal.mask[:, list(spec.modalities).index("proc_context")].all()           # still a model input
    assert relation_lines(stats, spec) == [relation_lines(stats, spec)[0]] and \
        relation_lines(stats, spec)[0].startswith("modality 'proc', column 'temp': relation residual across to vib ")
    off = parse_spec({**data, "model": {"cross_modal_relations": False}})
    assert relation_pairs(off) == {} and "relations" not in \
        StatisticsFitter(off).add(_one_channel_rows(off, 60, rng)).result()


def _lagged_rows(spec, n, rng, shift=0.0):
    """A one-channel `proc` (temp, with a 10-minute context) whose temp follows the mean load of the last 3
    minutes, and `vib` whose window is the load now and whose context (where the spec has one) is the load's
    per-minute means: temp follows vib's past, not its present."""
    steps = spec.modalities["proc_context"].steps
    load = rng.normal(0, 1, (n, steps))                                   # per-minute load
    temp = 2 * load[:, -3:].mean(1) + shift + rng.normal(0, 0.05, n)
    vib = load[:, -1:] + rng.normal(0, 0.05, (n, 3))
    columns = {"machine_id": ["a", "b"] * (n // 2), "proc__present": [True] * n, "proc__temp": temp,
               "proc_context__present": [True] * n,
               "proc_context__temp": pa.array(np.repeat(temp[:, None], steps, 1).astype(np.float32).tolist(),
                                              pa.list_(pa.float32())),
               "vib__present": [True] * n, "vib__a": pa.array(vib.astype(np.float32).tolist(), pa.list_(pa.float32()))}
    if "vib_context" in spec.modalities:
        columns.update({"vib_context__present": [True] * n,
                        "vib_context__a": pa.array(load.astype(np.float32).tolist(), pa.list_(pa.float32()))})
    return pa.table(columns)


def test_a_peers_context_brings_its_history_into_the_cross_modal_relation():
    """Where a peer has a context of its own, its window's block means join the cross-modal design: a channel that
    follows the peer with a lag is then related to the peer's past (residual far below the current-value fit), the
    relation records which histories it read (`peer_history`), scoring reads them, and a departure still errs
    far more than normal ticks; a version without `peer_history` reads current values only."""
    from dmafn.features import peer_contexts, relation_lines
    from dmafn.spec import parse_spec
    from tests.conftest import tiny_spec_dict

    data = tiny_spec_dict()
    proc = {**data["modalities"]["proc"], "context": {"window": "10min"}}
    plain = parse_spec({**data, "modalities": {"proc": proc, "vib": data["modalities"]["vib"]}})
    spec = parse_spec({**data, "modalities": {"proc": proc, "vib": {**data["modalities"]["vib"],
                                                                    "context": {"window": "10min"}}}})
    assert peer_contexts(plain, "proc") == [] and peer_contexts(spec, "proc") == ["vib_context"]
    rng = np.random.default_rng(7)
    now_only = StatisticsFitter(plain).add(_lagged_rows(plain, 800, rng)).result()["relations"]["proc_context"]
    fitter = StatisticsFitter(spec).add(_lagged_rows(spec, 800, rng))
    stats = fitter.result()
    fitted = stats["relations"]["proc_context"]
    assert "peer_history" not in now_only and fitted["peer_history"] == ["vib_context"]
    assert len(fitted["cross_channels"][0]["weights"]) == 2 + 3          # vib now (mean, swing), 3 blocks of its 10 minutes
    assert fitted["cross_channels"][0]["residual_std"] < 0.3 * now_only["cross_channels"][0]["residual_std"]
    same_statistics(stats, _fit_in_buckets(fitter, 2)[2])
    at = list(spec.modalities).index("proc")
    normal = featurize(_lagged_rows(spec, 200, rng), spec, stats).relation_errors[:, at]
    shifted = featurize(_lagged_rows(spec, 200, rng, shift=1.0), spec, stats).relation_errors[:, at]
    assert normal.mean() < 3 and shifted.mean() > 20 * normal.mean()
    assert "across to vib and the history of vib_context" in relation_lines(stats, spec)[0]


def test_a_relations_fit_keeps_per_entity_only_what_grows_with_its_design_not_its_square():
    """A fleet of many entities: the fitter's relations hold one d x d cross product per channel for the whole
    fleet, and per entity only counts, sums and ranges (O(d)): 200 more entities add far less than a d x d matrix
    each (the fitter before kept one per entity and channel, ~4 KB here, and fails this)."""
    import pickle

    from dmafn.spec import parse_spec
    from tests.conftest import tiny_spec_dict

    data = tiny_spec_dict()
    columns = [f"c{j}" for j in range(6)]
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "columns": columns, "context": {"window": "10min"}}}
    spec = parse_spec(data)
    steps = spec.modalities["proc_context"].steps
    rng = np.random.default_rng(0)

    def rows(entities, per_entity=30):
        n = entities * per_entity
        history = rng.normal(0, 1, (n, steps, len(columns)))
        keys = [f"e{i // per_entity}" for i in range(n)]
        offsets = np.repeat(rng.normal(0, 10, entities), per_entity)[:, None]
        current = history[:, -1, :] + offsets
        return pa.table({"machine_id": keys, "proc__present": [True] * n,
                         **{f"proc__{c}": current[:, j] for j, c in enumerate(columns)},
                         "proc_context__present": [True] * n,
                         **{f"proc_context__{c}": pa.array((history[:, :, j] + offsets).astype(np.float32).tolist(),
                                                           pa.list_(pa.float32())) for j, c in enumerate(columns)}})

    size = {e: len(pickle.dumps(StatisticsFitter(spec).add(rows(e)).relations_)) for e in (10, 210)}
    d = (len(columns) - 1) * (1 + 3)                 # the other 5 channels, now and over 3 history blocks: 20
    per_entity_channel = (size[210] - size[10]) / 200 / len(columns)
    assert per_entity_channel < 8 * d * d / 2, per_entity_channel     # a d x d matrix per entity would be 3,200 B


def test_a_context_view_with_relations_speaks_only_through_them():
    """Where relations were fitted, the context view is absent to the model (mask False, zero inputs) while its
    relation errors still reach the parent; a version saved before (no `model_input` key) keeps it as input."""
    spec = _relation_spec()
    rng = np.random.default_rng(2)
    fitted = StatisticsFitter(spec).add(_relation_rows(spec, 300, rng, {"a": 0.0})).result()
    assert fitted["relations"]["proc_context"]["model_input"] is False
    rows = _relation_rows(spec, 5, rng, {"a": 0.0}, drift=0.5)
    now = featurize(rows, spec, fitted)
    proc, ctx = now.modalities.index("proc"), now.modalities.index("proc_context")
    assert now.mask[:, proc].all() and not now.mask[:, ctx].any() and not now.inputs["proc_context"].any()
    assert (now.relation_errors[:, proc] > 10).all()
    before = {**fitted, "relations": {"proc_context": {k: v for k, v in fitted["relations"]["proc_context"].items()
                                                       if k != "model_input"}}}
    old = featurize(rows, spec, before)
    assert old.mask[:, ctx].all() and old.inputs["proc_context"].any()
    np.testing.assert_array_equal(old.relation_errors, now.relation_errors)


def test_a_relation_never_extrapolates_from_a_predictor_outside_the_range_it_was_fitted_on():
    """Each relation keeps the range of every quantity its designs read, once (not per channel), per entity (the
    fleet's for an unseen one); a predictor far outside it (an event in another channel, or still in its history)
    is held at the range's edge, so it cannot make the target look wrong by more than the training range allows.
    A version that kept the ranges per channel's design scores the same; one without ranges does not clip."""
    from dmafn.features import design_index

    spec = _relation_spec()
    rng = np.random.default_rng(1)
    offsets = {"a": 0.0, "b": 5.0}
    fitted = StatisticsFitter(spec).add(_relation_rows(spec, 600, rng, offsets)).result()
    relation = fitted["relations"]["proc_context"]
    lo, hi = relation["ranges"]["entities"]["a"]
    assert len(lo) == 2 * (1 + 3) and all(a < b for a, b in zip(lo, hi))      # 2 channels, now and 3 blocks
    fleet_lo, fleet_hi = (np.asarray(r) for r in relation["ranges"]["fleet"])
    assert np.all(fleet_lo <= lo) and np.all(fleet_hi >= hi)
    assert not any("entity_ranges" in c for c in relation["channels"])

    rows = _relation_rows(spec, 50, rng, {"a": 0.0})
    def with_pressure_history(shift):
        hist = np.asarray(rows["proc_context__pres"].to_pylist()) + shift
        return rows.set_column(rows.column_names.index("proc_context__pres"), "proc_context__pres",
                               pa.array(hist.astype(np.float32).tolist(), pa.list_(pa.float32())))
    proc = list(spec.modalities).index("proc")
    far = featurize(with_pressure_history(50.0), spec, fitted).relation_errors[:, proc]
    farther = featurize(with_pressure_history(500.0), spec, fitted).relation_errors[:, proc]
    np.testing.assert_allclose(far, farther, rtol=1e-6)          # held at the edge: how far out no longer matters

    def per_channel(c, fit):                                 # how versions saved before 2026-12-02's change kept them
        idx = design_index(2, 3, c)
        pick = lambda r: [list(np.asarray(r[0])[idx]), list(np.asarray(r[1])[idx])]
        return {**fit, "range": pick(relation["ranges"]["fleet"]),
                "entity_ranges": {k: pick(r) for k, r in relation["ranges"]["entities"].items()}}
    older = {k: v for k, v in relation.items() if k != "ranges"}
    older["channels"] = [per_channel(c, fit) for c, fit in enumerate(relation["channels"])]
    np.testing.assert_allclose(featurize(with_pressure_history(500.0), spec,
                                         {**fitted, "relations": {"proc_context": older}}).relation_errors[:, proc],
                               farther, rtol=1e-9)
    unclipped = {**fitted, "relations": {"proc_context": {k: v for k, v in relation.items() if k != "ranges"}}}
    assert featurize(with_pressure_history(500.0), spec, unclipped).relation_errors[:, proc].mean() > 10 * far.mean()


def test_a_look_back_day_reads_only_the_row_groups_its_statistics_allow_with_the_same_rows(tmp_path, tiny_spec,
                                                                                          monkeypatch):
    """The day before a shard's first date is read for its last minutes only: row groups whose time
    statistics end before the look-back are skipped (same rows as reading the whole file); a file without
    statistics, or timed in another unit, is read whole or pruned alike."""
    import datetime as dt

    import pyarrow.parquet as pq

    import pipelines.ingest as ingest
    from pipelines.parquet_files import open_parquet, row_groups_since
    from pipelines.storage import Storage

    spec = _proc_spec(tiny_spec, tmp_path)
    day = 1_704_153_600_000_000                                   # 2024-01-02 00:00 UTC
    minutes = np.arange(-1440, 0)                                 # every minute of 2024-01-01
    before = pa.table({"machine_id": ["a"] * 1440,
                       "ts": pa.array(day + minutes * 60_000_000, pa.timestamp("us", tz="UTC")),
                       "temp": np.arange(1440, dtype=float)})
    pq.write_table(before, _dir(tmp_path, "2024-01-01") / "part-0.parquet", row_group_size=100)
    pq.write_table(before.slice(0, 2).set_column(1, "ts", before["ts"].slice(0, 2).cast(pa.timestamp("ms"))),
                   _dir(tmp_path, "2024-01-01") / "part-1.parquet", write_statistics=False)
    _write(tmp_path / "date=2024-01-02" / "part-0.parquet", before.slice(0, 1).set_column(
        1, "ts", pa.array([day], pa.timestamp("us", tz="UTC"))))
    fs = Storage().filesystem(str(tmp_path))
    parquet = open_parquet(fs, str(tmp_path / "date=2024-01-01" / "part-0.parquet"))
    assert row_groups_since(parquet, "ts", day - 2 * 60_000_000) == [14]        # rows 1400-1439: the last group
    assert row_groups_since(parquet, "ts", day + 1) == []
    assert row_groups_since(open_parquet(fs, str(tmp_path / "date=2024-01-01" / "part-1.parquet")), "ts", day) is None
    assert row_groups_since(pq.ParquetFile(_ms_file(tmp_path, before)), "ts", day - 2 * 60_000_000) == [14]

    shard = _shard(tmp_path, spec, [dt.date(2024, 1, 2)])
    pruned = ingest.read_shard(shard, spec, Storage())
    monkeypatch.setattr(ingest, "row_groups_since", lambda *a: None)
    whole = ingest.read_shard(shard, spec, Storage())
    assert pruned.tables["proc"].equals(whole.tables["proc"]) and pruned.tables["proc"].height == 3   # 23:59, 23:58 + own


def test_a_lake_timed_in_epoch_milliseconds_reads_as_one_timed_in_timestamps(tmp_path, tiny_spec, monkeypatch):
    """With `time_unit: ms`, files storing the time as integer milliseconds (a Kafka sink's) read the same rows
    as timestamps, the look-back day pruned by the integers' statistics; a row filed under another date is
    quarantined as misplaced, as with timestamps."""
    import datetime as dt
    from dataclasses import replace

    import pyarrow.parquet as pq

    import pipelines.ingest as ingest
    from pipelines.parquet_files import open_parquet, row_groups_since, time_bounds
    from pipelines.storage import Storage

    day_ms = 1_704_153_600_000                                    # 2024-01-02 00:00 UTC
    minutes = np.arange(-1440, 0)
    before = pa.table({"machine_id": ["a"] * 1440, "ts": pa.array(day_ms + minutes * 60_000, pa.int64()),
                       "temp": np.arange(1440, dtype=float)})
    pq.write_table(before, _dir(tmp_path, "2024-01-01") / "part-0.parquet", row_group_size=100)
    _write(tmp_path / "date=2024-01-02" / "part-0.parquet", pa.table({
        "machine_id": ["a", "b"], "ts": pa.array([day_ms, day_ms - 7 * 86_400_000], pa.int64()), "temp": [5.0, 6.0]}))
    spec = replace(_proc_spec(tiny_spec, tmp_path), time_unit="ms")
    parquet = open_parquet(Storage().filesystem(str(tmp_path)), str(tmp_path / "date=2024-01-01" / "part-0.parquet"))
    assert time_bounds(parquet, "ts") is None                     # integers without a unit: nothing to go by
    assert row_groups_since(parquet, "ts", day_ms * 1000 - 2 * 60_000_000, "ms") == [14]

    shard = _shard(tmp_path, spec, [dt.date(2024, 1, 2)])
    pruned = ingest.read_shard(shard, spec, Storage())
    monkeypatch.setattr(ingest, "row_groups_since", lambda *a: None)
    whole = ingest.read_shard(shard, spec, Storage())
    assert pruned.tables["proc"].equals(whole.tables["proc"])
    assert sorted(pruned.tables["proc"].select(TIME, "temp").rows()) == [
        ((day_ms - 120_000) * 1000, 1438.0), ((day_ms - 60_000) * 1000, 1439.0), (day_ms * 1000, 5.0)]
    assert pruned.quarantined.select("entity", "reason").rows() == [("b", "timed outside its date partition 2024-01-02")]


def test_a_modality_with_its_own_time_unit_reads_float_epoch_seconds_and_prunes_by_their_statistics(tmp_path,
                                                                                                     tiny_spec,
                                                                                                     monkeypatch):
    """One table timed by a log shipper's float epoch seconds, with the modality's own `time_unit: s` (the spec's
    unit, or none, for the others): read as the twin timed by timestamps is, its look-back day pruned by the float
    statistics (whole microseconds around them) to the row groups the first ticks read."""
    import datetime as dt
    from dataclasses import replace

    import pyarrow.parquet as pq

    import pipelines.ingest as ingest
    from pipelines.parquet_files import open_parquet, row_groups_since, time_bounds
    from pipelines.storage import Storage

    day_s = 1_704_153_600                                         # 2024-01-02 00:00 UTC
    seconds = day_s + np.arange(-1440, 0) * 60 + 0.5              # every minute of the day before, at :00.5
    for root, times in ((tmp_path / "floats", pa.array(seconds)),
                        (tmp_path / "stamps", pa.array((seconds * 1e6).astype("int64"), pa.timestamp("us")))):
        _dir(root, "2024-01-01")
        pq.write_table(pa.table({"machine_id": ["a"] * 1440, "ts": times, "temp": np.arange(1440, dtype=float)}),
                       root / "date=2024-01-01" / "part-0.parquet", row_group_size=100)
        own = pa.array([day_s + 30.0]) if root.name == "floats" else pa.array([(day_s + 30) * 10 ** 6],
                                                                                pa.timestamp("us"))
        _write(root / "date=2024-01-02" / "part-0.parquet", pa.table({"machine_id": ["a"], "ts": own, "temp": [5.0]}))
    floats = _proc_spec(tiny_spec, tmp_path / "floats")
    floats = replace(floats, modalities={"proc": replace(floats.modalities["proc"], time_unit="s")})
    stamps = _proc_spec(tiny_spec, tmp_path / "stamps")
    parquet = open_parquet(Storage().filesystem(str(tmp_path)), str(tmp_path / "floats" / "date=2024-01-01" /
                                                                     "part-0.parquet"))
    assert time_bounds(parquet, "ts") is None                     # a number without a unit: nothing to go by
    assert time_bounds(parquet, "ts", "s")[0] == ((day_s - 86_400) * 10 ** 6 + 500_000,
                                                  (day_s - 86_400 + 99 * 60) * 10 ** 6 + 500_000)
    assert row_groups_since(parquet, "ts", (day_s - 120) * 10 ** 6, "s") == [14]
    got = ingest.read_shard(_shard(tmp_path, floats, [dt.date(2024, 1, 2)]), floats, Storage())
    want = ingest.read_shard(_shard(tmp_path, stamps, [dt.date(2024, 1, 2)]), stamps, Storage())
    assert got.tables["proc"].sort(TIME).equals(want.tables["proc"].sort(TIME))
    assert got.tables["proc"][TIME].to_list() == [(day_s - 120 + 0.5) * 10 ** 6, (day_s - 60 + 0.5) * 10 ** 6,
                                                  (day_s + 30) * 10 ** 6]
    monkeypatch.setattr(ingest, "row_groups_since", lambda *a: None)
    assert ingest.read_shard(_shard(tmp_path, floats, [dt.date(2024, 1, 2)]), floats, Storage()).tables["proc"] \
        .sort(TIME).equals(got.tables["proc"].sort(TIME))


def test_naive_times_of_a_plants_wall_clock_read_as_the_instants_they_show(tmp_path, tiny_spec, monkeypatch):
    """A historian writing the plant's local time without a zone (`naive_times: local`, the spec's `timezone`): its
    naive timestamps and its ISO text without an offset read as the instants a twin table timed in UTC holds - the
    look-back day pruned by the statistics read as that wall clock; a time the clocks skipped (spring forward) or
    showed twice (fall back) is quarantined with the time named; a time with a zone and an epoch count are instants
    already. Without the setting a naive time is UTC, as before."""
    import datetime as dt
    from dataclasses import replace

    import pyarrow.parquet as pq

    import pipelines.ingest as ingest
    from pipelines.parquet_files import open_parquet, time_bounds
    from pipelines.storage import Storage
    from pipelines.stored_times import times_from_text, times_from_wall_clock

    berlin = "Europe/Berlin"
    clocks = pl.Series("ts", [dt.datetime(2024, 1, 5, 12), dt.datetime(2024, 3, 31, 2, 30),
                              dt.datetime(2024, 10, 27, 2, 30), dt.datetime(2024, 7, 1, 0, 0), None])
    read, unread = times_from_wall_clock(clocks, berlin)
    assert read.to_list() == [dt.datetime(2024, 1, 5, 11), None, None, dt.datetime(2024, 6, 30, 22), None]
    assert unread.to_list() == [None, "2024-03-31 02:30:00", "2024-10-27 02:30:00", None, None]
    texts = pl.Series(["2024-01-05 12:00", "2024-01-05T12:00Z", "2024-01-05T12:00+02:00", "2024-03-31T02:30"])
    assert times_from_text(texts, None, berlin)[0].to_list() == [
        dt.datetime(2024, 1, 5, 11), dt.datetime(2024, 1, 5, 12), dt.datetime(2024, 1, 5, 10), None]

    day = dt.date(2024, 1, 2)                                     # Berlin: 2024-01-01 23:00 UTC onwards
    start = 1_704_150_000_000_000                                 # 2024-01-01 23:00 UTC = Berlin's midnight
    minute = 60_000_000
    look_back = start - np.arange(600, 0, -1) * minute            # the last 10 hours of Berlin's 2024-01-01
    own = start + np.arange(0, 600) * minute
    for root, stored in (("utc", lambda us: pa.array(us, pa.timestamp("us", tz="UTC"))),
                         ("wall", lambda us: pa.array(us + 3_600_000_000, pa.timestamp("us")))):   # UTC+1 in winter
        for date, times in (("2024-01-01", look_back), ("2024-01-02", own)):
            _dir(tmp_path / root, date)
            pq.write_table(pa.table({"machine_id": ["a"] * len(times), "ts": stored(times),
                                     "temp": np.arange(len(times), dtype=float)}),
                           tmp_path / root / f"date={date}" / "part-0.parquet", row_group_size=60)
    _write(tmp_path / "wall" / "date=2024-01-02" / "text.parquet", pa.table({    # text without an offset: alike
        "machine_id": ["b", "b"], "ts": ["2024-01-02 00:30:00", "2024-01-02T00:31"], "temp": [1.0, 2.0]}))
    _write(tmp_path / "utc" / "date=2024-01-02" / "text.parquet", pa.table({
        "machine_id": ["b", "b"], "ts": ["2024-01-01T23:30:00Z", "2024-01-01T23:31Z"], "temp": [1.0, 2.0]}))
    utc = replace(_proc_spec(tiny_spec, tmp_path / "utc"), timezone=berlin)
    wall = replace(_proc_spec(tiny_spec, tmp_path / "wall"), timezone=berlin)
    wall = replace(wall, modalities={"proc": replace(wall.modalities["proc"], naive_times="local")})
    assert (wall.naive_zone_in(wall.modalities["proc"]), utc.naive_zone_in(utc.modalities["proc"])) == (berlin, None)
    parquet = open_parquet(Storage().filesystem(str(tmp_path)), str(tmp_path / "wall" / "date=2024-01-01" /
                                                                     "part-0.parquet"))
    assert time_bounds(parquet, "ts", None, berlin) == time_bounds(
        pq.ParquetFile(tmp_path / "utc" / "date=2024-01-01" / "part-0.parquet"), "ts")
    got = ingest.read_shard(_shard(tmp_path, wall, [day]), wall, Storage())
    want = ingest.read_shard(_shard(tmp_path, utc, [day]), utc, Storage())
    assert got.tables["proc"].sort("machine_id", TIME).equals(want.tables["proc"].sort("machine_id", TIME))
    assert got.tables["proc"][TIME].min() == start - 2 * minute   # the look-back rows within tolerance only
    assert got.quarantined.is_empty() and want.quarantined.is_empty()
    monkeypatch.setattr(ingest, "row_groups_since", lambda *a: None)
    assert ingest.read_shard(_shard(tmp_path, wall, [day]), wall, Storage()).tables["proc"].sort(
        "machine_id", TIME).equals(got.tables["proc"].sort("machine_id", TIME))
    as_utc = replace(wall, modalities={"proc": replace(wall.modalities["proc"], naive_times=None)})
    shifted = ingest.read_shard(_shard(tmp_path, as_utc, [day]), as_utc, Storage())   # naive read as UTC: 1 h late
    assert shifted.tables["proc"][TIME].max() == got.tables["proc"][TIME].max() + 3_600_000_000

    spring = pa.table({"machine_id": ["a"], "ts": pa.array([dt.datetime(2024, 3, 31, 2, 30)], pa.timestamp("us")),
                       "temp": [1.0]})
    table, unread = ingest.read_times(spring, "ts", None, berlin)
    assert unread.to_list() == ["time column 'ts' holds 2024-03-31 02:30:00, a wall-clock time Europe/Berlin's "
                                "clocks skipped or showed twice (a daylight-saving change)"]
    assert table["ts"].to_pylist() == [None]


def test_int96_times_as_spark_hive_and_impala_write_them_read_as_the_same_rows(tmp_path, tiny_spec):
    """Parquet's legacy INT96 timestamps (Spark's default before 3.0, Hive, Impala) read as nanosecond timestamps:
    a shard - its day and the look-back day, which the INT96 statistics cannot prune - reads the rows a twin timed
    by INT64 microseconds holds."""
    import datetime as dt

    import pyarrow.parquet as pq

    from pipelines.ingest import read_shard
    from pipelines.parquet_files import open_parquet, time_bounds
    from pipelines.storage import Storage

    day = 1_704_153_600_000_000                                   # 2024-01-02 00:00 UTC
    minute = 60_000_000
    for root, legacy in (("int64", False), ("int96", True)):
        for date, start in (("2024-01-01", day - 300 * minute), ("2024-01-02", day)):
            times = pa.array(start + np.arange(300) * minute, pa.timestamp("us"))
            pq.write_table(pa.table({"machine_id": ["a"] * 300, "ts": times, "temp": np.arange(300, dtype=float)}),
                           _dir(tmp_path / root, date) / "part-0.parquet", row_group_size=50,
                           use_deprecated_int96_timestamps=legacy)
    legacy_file = str(tmp_path / "int96" / "date=2024-01-01" / "part-0.parquet")
    with open_parquet(Storage().filesystem(legacy_file), legacy_file) as parquet:
        assert parquet.metadata.row_group(0).column(1).physical_type == "INT96"
        assert parquet.schema_arrow.field("ts").type == pa.timestamp("ns") and time_bounds(parquet, "ts") is None
    got, want = (read_shard(_shard(tmp_path, sp, [dt.date(2024, 1, 2)]), sp, Storage())
                 for sp in (_proc_spec(tiny_spec, tmp_path / r) for r in ("int96", "int64")))
    assert got.quarantined.is_empty() and got.tables["proc"].equals(want.tables["proc"])
    assert got.tables["proc"][TIME].min() == day - 2 * minute       # the look-back rows within tolerance only


def test_an_hour_the_clocks_showed_twice_is_read_by_the_order_each_machine_wrote_it(tmp_path, tiny_spec):
    """Fall back: a historian writing Berlin's wall clock logs 02:00-02:59 twice on 2024-10-27, in order. Each
    machine's rows (interleaved with another's, as naive timestamps and as ISO text) are read by their order: before
    the clock steps back the first pass (summer time, 00:xx UTC), after it the second (01:xx UTC) - the instants a twin
    table timed in UTC holds. A machine whose repeat shows no step back (one pass alone), or two, is quarantined as
    before; a late row a few minutes back is no step back."""
    import datetime as dt
    from dataclasses import replace

    from pipelines.ingest import read_shard, read_times
    from pipelines.storage import Storage
    from pipelines.stored_times import times_from_wall_clock

    berlin = "Europe/Berlin"
    utc = [dt.datetime(2024, 10, 26, 23, 50) + dt.timedelta(minutes=10 * i) for i in range(16)]   # to 02:20 UTC
    wall = [t.replace(tzinfo=dt.timezone.utc).astimezone(__import__("zoneinfo").ZoneInfo(berlin)).replace(tzinfo=None)
            for t in utc]
    assert wall[1:4] == wall[7:10]                                     # 02:00, 02:10, 02:20 shown twice
    rows = pl.DataFrame({"machine_id": [m for t in wall for m in ("a", "b")], "ts": [t for t in wall for _ in "ab"]})
    read, unread = times_from_wall_clock(rows["ts"], berlin, rows["machine_id"])
    assert read.to_list() == [t for t in utc for _ in "ab"] and unread.null_count() == len(rows)
    texts = rows["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S")
    table, why = read_times(pa.table({"machine_id": rows["machine_id"].to_arrow(), "ts": texts.to_arrow()}), "ts",
                            None, berlin, None, ["machine_id"])
    assert table["ts"].to_pylist() == [t for t in utc for _ in "ab"] and why.null_count() == len(rows)
    # one pass alone (no step back), two steps back, a late row: what cannot be told apart stays unread
    one = pl.Series([wall[1], wall[2], wall[3]])
    assert times_from_wall_clock(one, berlin, pl.Series(["a"] * 3))[0].to_list() == [None] * 3
    twice_back = pl.Series([wall[1], wall[2], wall[1], wall[2], wall[1]])
    assert times_from_wall_clock(twice_back, berlin, pl.Series(["a"] * 5))[0].null_count() == 5
    late = pl.Series([wall[1], wall[2], wall[2] - dt.timedelta(minutes=5), *wall[3:9]])
    assert times_from_wall_clock(late, berlin, pl.Series(["a"] * 9))[0].to_list() == [
        utc[1], utc[2], utc[2] - dt.timedelta(minutes=5), *utc[3:9]]

    # through a shard: the wall-clock table reads as its UTC twin, nothing quarantined
    for root, stamps in (("utc", pa.array([t for t in utc for _ in "ab"], pa.timestamp("us", tz="UTC"))),
                         ("wall", pa.array([t for t in wall for _ in "ab"], pa.timestamp("us")))):
        _write(tmp_path / root / "date=2024-10-27" / "part-0.parquet", pa.table({
            "machine_id": rows["machine_id"].to_arrow(), "ts": stamps, "temp": np.arange(32, dtype=float)}))
    specs = [replace(_proc_spec(tiny_spec, tmp_path / root), timezone=berlin) for root in ("utc", "wall")]
    specs[1] = replace(specs[1], modalities={"proc": replace(specs[1].modalities["proc"], naive_times="local")})
    day = [dt.date(2024, 10, 27)]
    twin, got = (read_shard(_shard(tmp_path, sp, day), sp, Storage()) for sp in specs)
    assert got.quarantined.is_empty() and got.tables["proc"].sort("machine_id", TIME).equals(
        twin.tables["proc"].sort("machine_id", TIME))


def test_a_time_stored_as_a_date_is_its_midnight(tmp_path, tiny_spec):
    """A daily table (lab results, a maintenance log) timed by a date alone: read as the date's midnight - UTC, or
    with `naive_times: local` the plant's -, checked, read and pruned by the date statistics like a timestamp."""
    import datetime as dt
    from dataclasses import replace

    import pyarrow.parquet as pq

    from pipelines.ingest import read_shard, read_times
    from pipelines.parquet_files import time_bounds
    from pipelines.storage import Storage

    days = pa.array([dt.date(2024, 1, 1), dt.date(2024, 1, 2)], pa.date32())
    table = pa.table({"machine_id": ["a", "a"], "ts": days, "temp": [1.0, 2.0]})
    check_schema(table.schema, tiny_spec, tiny_spec.modalities["proc"], "/d")
    assert read_times(table, "ts", None)[0]["ts"].to_pylist() == [dt.datetime(2024, 1, 1), dt.datetime(2024, 1, 2)]
    assert read_times(table, "ts", None, "Europe/Berlin")[0]["ts"].to_pylist() == [
        dt.datetime(2023, 12, 31, 23), dt.datetime(2024, 1, 1, 23)]
    day = 1_704_153_600_000_000                                   # 2024-01-02 00:00 UTC
    pq.write_table(table.slice(1), _dir(tmp_path, "2024-01-02") / "part-0.parquet")
    pq.write_table(pa.table({"machine_id": ["a"] * 2, "ts": pa.array([dt.date(2023, 12, 31), dt.date(2024, 1, 1)],
                                                                      pa.date64()), "temp": [0.0, 1.0]}),
                   _dir(tmp_path, "2024-01-01") / "part-0.parquet", row_group_size=1)
    assert time_bounds(pq.ParquetFile(tmp_path / "date=2024-01-01" / "part-0.parquet"), "ts") == [
        (day - 2 * 86_400_000_000, day - 2 * 86_400_000_000), (day - 86_400_000_000, day - 86_400_000_000)]
    spec = _proc_spec(tiny_spec, tmp_path)
    spec = replace(spec, modalities={"proc": replace(spec.modalities["proc"], tolerance_us=86_400_000_000)})
    got = read_shard(_shard(tmp_path, spec, [dt.date(2024, 1, 2)]), spec, Storage())
    assert sorted(got.tables["proc"][TIME].to_list()) == [day - 86_400_000_000, day]   # 2023-12-31: beyond reach
    assert got.quarantined.is_empty()                             # a look-back day's rows are its own date's


def test_columns_inside_struct_columns_are_read_by_their_dotted_path(tmp_path, tiny_spec, monkeypatch):
    """JSON landed in Parquet nests its fields: a spec's `payload.temp` reads field `temp` of struct `payload`, and a
    time at `event.ts` is a time like any (its look-back day pruned by the nested column's statistics); a file
    holding a top-level column named `payload.temp` (a staged piece, a flattened export) reads alike; a path to no
    field is named."""
    import datetime as dt
    from dataclasses import replace

    import pyarrow.parquet as pq

    import pipelines.ingest as ingest
    from pipelines.parquet_files import field_of, open_parquet, row_groups_since
    from pipelines.storage import Storage

    day = 1_704_153_600_000_000                                   # 2024-01-02 00:00 UTC
    minutes = np.arange(-1440, 0)
    nested = lambda times, temps: pa.table({                       # noqa: E731
        "machine_id": ["a"] * len(times),
        "event": pa.StructArray.from_arrays([pa.array(times, pa.timestamp("us", tz="UTC")),
                                             pa.array(["sensor"] * len(times))], ["ts", "origin"]),
        "payload": pa.StructArray.from_arrays([pa.array(temps, pa.float64()), pa.array([1] * len(times))],
                                              ["temp", "unit_code"])})
    pq.write_table(nested(day + minutes * 60_000_000, np.arange(1440, dtype=float)),
                   _dir(tmp_path, "2024-01-01") / "part-0.parquet", row_group_size=100)
    _write(tmp_path / "date=2024-01-02" / "part-0.parquet", nested([day], [5.0]))
    _write(tmp_path / "date=2024-01-02" / "part-1.parquet", pa.table({      # flattened: a top-level dotted name
        "machine_id": ["b"], "event.ts": pa.array([day], pa.timestamp("us", tz="UTC")), "payload.temp": [6.0]}))
    proc = replace(tiny_spec.modalities["proc"], path=str(tmp_path), columns=("payload.temp",))
    spec = replace(tiny_spec, time="event.ts", modalities={"proc": proc})
    parquet = open_parquet(Storage().filesystem(str(tmp_path)), str(tmp_path / "date=2024-01-01" / "part-0.parquet"))
    assert field_of(parquet.schema_arrow, "payload.temp") == pa.field("payload.temp", pa.float64())
    assert field_of(parquet.schema_arrow, "payload.pressure") is None and field_of(parquet.schema_arrow, "x.y") is None
    assert row_groups_since(parquet, "event.ts", day - 2 * 60_000_000) == [14]

    shard = _shard(tmp_path, spec, [dt.date(2024, 1, 2)])
    pruned = ingest.read_shard(shard, spec, Storage())
    monkeypatch.setattr(ingest, "row_groups_since", lambda *a: None)
    assert pruned.tables["proc"].equals(ingest.read_shard(shard, spec, Storage()).tables["proc"])
    assert sorted(pruned.tables["proc"].select("machine_id", TIME, "payload.temp").rows()) == [
        ("a", day - 120_000_000, 1438.0), ("a", day - 60_000_000, 1439.0), ("a", day, 5.0), ("b", day, 6.0)]
    missing = replace(spec, modalities={"proc": replace(proc, columns=("payload.pressure",))})
    with pytest.raises(DataError, match="column 'payload.pressure' not found; columns are \\['event', 'machine_id', "
                                        "'payload'\\]"):
        check_schema(parquet.schema_arrow, missing, missing.modalities["proc"], "f")


def _dir(tmp_path, day):
    folder = tmp_path / f"date={day}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _ms_file(tmp_path, table):
    """The same rows with the time column in milliseconds, written outside the table's folders."""
    import pyarrow.parquet as pq

    path = tmp_path.parent / f"{tmp_path.name}-ms.parquet"
    pq.write_table(table.set_column(1, "ts", table["ts"].cast(pa.timestamp("ms", tz="UTC"))), path, row_group_size=100)
    return path


def test_an_entity_bucket_reads_only_the_row_groups_its_statistics_allow_with_the_same_rows(tmp_path, tiny_spec,
                                                                                            monkeypatch):
    """A row group whose entity statistics show one key (no nulls) is read only by the bucket that key falls in
    (a file per machine, or files sorted by machine); row groups of several keys, with a null key, of an integer
    key or without statistics are handled as the rows are (integers as their text); every bucket gets the same
    rows as when each reads every row group."""
    import datetime as dt
    import zlib

    import polars as pl
    import pyarrow.parquet as pq

    import pipelines.ingest as ingest
    from pipelines.parquet_files import open_parquet
    from pipelines.shards import row_groups_in_bucket
    from pipelines.storage import Storage

    spec = _proc_spec(tiny_spec, tmp_path)
    day = 1_704_153_600_000_000                                   # 2024-01-02 00:00 UTC
    names = [f"pump-{i}" for i in range(8) for _ in range(10)]    # sorted by machine: 10 rows each
    table = pa.table({"machine_id": names, "ts": pa.array([day + i for i in range(80)], pa.timestamp("us", tz="UTC")),
                      "temp": [1.0] * 80})
    folder = _dir(tmp_path, "2024-01-02")
    pq.write_table(table, folder / "sorted.parquet", row_group_size=10)           # a machine per row group
    pq.write_table(table, folder / "mixed.parquet", row_group_size=15)            # most hold two machines
    pq.write_table(table, folder / "nostats.parquet", row_group_size=10, write_statistics=False)
    with_null = table.slice(0, 10).set_column(0, "machine_id", pa.array(["pump-0"] * 9 + [None]))
    pq.write_table(with_null, folder / "null.parquet")
    fs = Storage().filesystem(str(tmp_path))
    sorted_file = open_parquet(fs, str(folder / "sorted.parquet"))
    owner = {f"pump-{i}": zlib.crc32(f"pump-{i}".encode()) % 3 for i in range(8)}
    for bucket in range(3):
        assert row_groups_in_bucket(sorted_file, ["machine_id"], bucket, 3) == \
            [i for i in range(8) if owner[f"pump-{i}"] == bucket]
    assert row_groups_in_bucket(sorted_file, ["machine_id"], 0, 1) is None
    mixed = open_parquet(fs, str(folder / "mixed.parquet"))
    for bucket in range(3):                            # groups of pumps 0-1, 1-2, 3-4, 4-5, 6-7 are read by all
        kept = [0, 1, 2, 3, 4] + ([5] if owner["pump-7"] == bucket else [])       # the last holds pump-7 alone
        assert row_groups_in_bucket(mixed, ["machine_id"], bucket, 3) == (None if len(kept) == 6 else kept)
    assert row_groups_in_bucket(open_parquet(fs, str(folder / "nostats.parquet")), ["machine_id"], 0, 3) is None
    other = (owner["pump-0"] + 1) % 3                  # a bucket pump-0 is not in: the null key may be
    assert row_groups_in_bucket(open_parquet(fs, str(folder / "null.parquet")), ["machine_id"], other, 3) is None
    numbered = pa.table({"machine_id": pa.array([7] * 5 + [8] * 5, pa.int64()), "ts": table["ts"].slice(0, 10)})
    pq.write_table(numbered, tmp_path / "numbered.parquet", row_group_size=5)
    expected = [r for r, key in enumerate(["7", "8"]) if zlib.crc32(key.encode()) % 2 == 1]
    assert row_groups_in_bucket(pq.ParquetFile(tmp_path / "numbered.parquet"), ["machine_id"], 1, 2) == expected

    size = sum(p.stat().st_size for p in folder.iterdir())
    shards = _shards(spec, [dt.date(2024, 1, 2)], shard_bytes=size // 3 + 1)
    assert {s.buckets for s in shards} == {3}
    pruned = [ingest.read_shard(s, spec, Storage()).tables["proc"] for s in shards]
    monkeypatch.setattr(ingest, "row_groups_in_bucket", lambda *a: None)
    whole = [ingest.read_shard(s, spec, Storage()).tables["proc"] for s in shards]
    for got, want in zip(pruned, whole):
        assert got.sort(["machine_id", "_t"]).equals(want.sort(["machine_id", "_t"]))
    counts = pl.concat(pruned)["machine_id"].value_counts().sort("machine_id")["count"].to_list()
    assert counts == [39] + [30] * 7                   # 3 files x 10 rows, and pump-0's 9 of the file with a null


@pytest.mark.parametrize("flush_every_row_group", [False, True])
def test_a_split_file_gives_each_bucket_the_same_rows_and_quarantine_as_the_whole_file(tmp_path, monkeypatch,
                                                                                       flush_every_row_group):
    """`split_file` writes a file that mixes machines in its row groups as one piece per entity bucket (a null key,
    bad values, invalid UTF-8 and a row of another date kept as they are, the columns of every modality reading
    the file, a context view included); each bucket reading its pieces gets the same rows, quarantine and
    presence as reading the whole files, and every row lands in exactly one piece - also when the split's
    buffer flushes after every row group (a piece file per bucket per flush). A file whose row groups hold one
    machine each stays where it is, as do such row groups of a file that also has mixed ones; a file without a
    spec column is named."""
    import datetime as dt
    from dataclasses import replace

    import polars as pl
    import pyarrow.parquet as pq

    from dmafn.spec import parse_spec
    from pipelines.ingest import CONFLICT, read_shard
    from pipelines.shards import bytes_by_date, list_inputs
    import pipelines.staging
    from pipelines.staging import split_file, with_pieces
    from pipelines.storage import Storage
    from tests.conftest import tiny_spec_dict

    if flush_every_row_group:
        monkeypatch.setattr(pipelines.staging, "SPLIT_BUFFER_BYTES", 1)
    data = tiny_spec_dict()
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "path": str(tmp_path / "proc"),
                                   "context": {"window": "1h"}},
                          "logs": {**data["modalities"]["logs"], "path": str(tmp_path / "logs")}}
    data["score"] = {"output": str(tmp_path / "scores")}
    spec = parse_spec(data)
    day, n = 1_704_153_600_000_000, 160                           # 2024-01-02 00:00 UTC
    machines = [f"pump-{i % 8}" for i in range(n)]                # interleaved: every row group mixes machines
    machines[7] = None
    ts = [day + i * 20_000_000 for i in range(n)]
    ts[9] = day - 5 * M                                           # filed under the wrong date
    temp = np.linspace(0, 1, n)
    temp[11] = np.nan
    for date, times in (("2024-01-01", [t - 86_400_000_000 for t in ts]), ("2024-01-02", ts)):
        folder = tmp_path / "proc" / f"date={date}"
        folder.mkdir(parents=True)
        pq.write_table(pa.table({"machine_id": machines, "ts": pa.array(times, pa.timestamp("us", tz="UTC")),
                                 "temp": temp, "extra": np.arange(n)}), folder / "mixed.parquet", row_group_size=25)
    by_machine = pa.table({"machine_id": sorted(f"pump-{i}" for i in range(8) for _ in range(5)),
                           "ts": pa.array([day + i * M for i in range(40)], pa.timestamp("us", tz="UTC")),
                           "temp": [1.0] * 40, "extra": list(range(40))})
    pq.write_table(by_machine, tmp_path / "proc" / "date=2024-01-02" / "sorted.parquet", row_group_size=5)
    partly = pa.concat_tables([by_machine.slice(0, 5), by_machine.take(list(range(0, 40, 5)))])   # then one of each
    pq.write_table(partly, tmp_path / "proc" / "date=2024-01-02" / "partly.parquet", row_group_size=5)
    msgs = [f"line {i}".encode() for i in range(n)]
    msgs[3] = b"bad \xff\xfe"
    log_ts = list(ts)
    log_ts[45], msgs[45] = ts[5], msgs[5]           # pump-5's line twice, in two row groups: one file's burst, kept
    (tmp_path / "logs" / "date=2024-01-02").mkdir(parents=True)
    pq.write_table(pa.table({"machine_id": machines, "ts": pa.array(log_ts, pa.timestamp("us", tz="UTC")),
                             "msg": _invalid_utf8(msgs)}), tmp_path / "logs" / "date=2024-01-02" / "part-0.parquet",
                   row_group_size=25)

    date = dt.date(2024, 1, 2)
    size = bytes_by_date(list_inputs(spec, [date], Storage()))[date]     # a context view lists its parent's files
    shards = _shards(spec, [date], shard_bytes=size // 3 + 1)
    assert {s.buckets for s in shards} == {3}
    own = sorted({f for s in shards for f in s.files if f.date == date}, key=lambda f: (f.modality, f.path))
    splits = [split_file(f, spec, Storage(), 3, str(tmp_path / "stage" / str(i))) for i, f in enumerate(own)]
    kept = {s.source.path.rsplit("/", 1)[1]: s.pieces for s in splits if s.source.modality != "proc_context"}
    assert kept["sorted.parquet"] is None
    partly_split = next(s for s in splits if s.source.path.endswith("partly.parquet"))
    assert partly_split.kept == (0,) and set(partly_split.pieces) == {0, 1, 2}   # pump-0's group stays, 2 move
    assert sum(pq.ParquetFile(p.path).metadata.num_rows for ps in partly_split.pieces.values() for p in ps) == 8
    for name, source_rows in (("mixed.parquet", n), ("part-0.parquet", n)):
        pieces = kept[name]
        assert set(pieces) == {0, 1, 2}
        assert sum(pq.ParquetFile(p.path).metadata.num_rows for ps in pieces.values() for p in ps) == source_rows
        # 160 rows in row groups of 25: a piece per flush that held the bucket's rows
        assert max(len(ps) for ps in pieces.values()) == (7 if flush_every_row_group else 1)
    assert "extra" not in pq.ParquetFile(kept["mixed.parquet"][0][0].path).schema_arrow.names
    for shard in shards:
        staged = with_pieces(shard, splits)
        assert {f.path for f in staged.files if f.date == date and "sorted" not in f.path} <= \
            {p.path for s in splits if s.pieces for ps in s.pieces.values() for p in ps} | {partly_split.source.path}
        assert [f.row_groups for f in staged.files if f.path == partly_split.source.path] == [(0,)] * 2
        assert {f.modality for f in staged.files} == {"proc", "proc_context", "logs"}
        got, want = read_shard(staged, spec, Storage()), read_shard(shard, spec, Storage())
        if "logs" in want.tables and want.tables["logs"]["machine_id"].eq("pump-5").any():
            assert want.tables["logs"].filter(pl.col("_t") == ts[5]).height == 2      # the burst: kept, staged too
        for name in want.tables:
            order = ["machine_id", "_t"]
            assert got.tables[name].sort(order).equals(want.tables[name].sort(order)), name
        assert got.quarantined.sort(pl.all()).equals(want.quarantined.sort(pl.all()))
        assert got.present.sort(pl.all()).equals(want.present.sort(pl.all()))
    reasons = pl.concat([read_shard(with_pieces(s, splits), spec, Storage()).quarantined for s in shards])
    assert reasons.group_by("source", "reason").len().sort("source", "reason").rows() == [
        ("logs", "invalid UTF-8 in column 'msg'", 1), ("logs", "null entity column 'machine_id'", 1),
        ("logs", "timed outside its date partition 2024-01-02", 1),
        ("proc", CONFLICT, 15),     # 6 keys of the sorted files' pumps that the mixed file times with other values
        ("proc", "null entity column 'machine_id'", 1), ("proc", "timed outside its date partition 2024-01-02", 1),
        ("proc", "unusable value in column 'temp'", 1)]

    pq.write_table(by_machine.drop(["temp"]), tmp_path / "no_temp.parquet")
    with pytest.raises(DataError, match=r"no_temp\.parquet\): column 'temp' not found"):
        split_file(replace(next(f for f in own if f.modality == "proc"), path=str(tmp_path / "no_temp.parquet")),
                   spec, Storage(), 3, str(tmp_path / "stage" / "bad"))


def test_a_dead_channel_is_noted_once_per_entity_naming_the_file_a_staged_piece_was_split_from(tmp_path):
    """A file mixing machines whose column `b` holds no value (a dead channel), split into entity buckets by
    staging: each bucket notes each of its machines' rows without `b` as one quarantine row naming the source file
    (not the piece, which staging deletes), counting them, as the whole file read alike does."""
    import datetime as dt

    import pyarrow.parquet as pq

    from dmafn.spec import parse_spec
    from pipelines.ingest import PARTLY_USED, read_shard
    from pipelines.shards import bytes_by_date, list_inputs
    from pipelines.staging import split_file, with_pieces
    from pipelines.storage import Storage
    from tests.conftest import tiny_spec_dict

    data = tiny_spec_dict()
    data["modalities"] = {"vib": {**data["modalities"]["vib"], "path": str(tmp_path / "vib"), "columns": ["a", "b"]}}
    spec = parse_spec(data)
    day, n = 1_704_153_600_000_000, 120                           # 2024-01-02 00:00 UTC
    source = _folder(tmp_path / "vib" / "date=2024-01-02") / "mixed.parquet"
    pq.write_table(pa.table({"machine_id": [f"pump-{i % 6}" for i in range(n)],
                             "ts": pa.array([day + i * 10_000_000 for i in range(n)], pa.timestamp("us", tz="UTC")),
                             "a": np.linspace(0, 1, n), "b": pa.array([None] * n, pa.float64())}),
                   source, row_group_size=20)
    date = dt.date(2024, 1, 2)
    shards = _shards(spec, [date], shard_bytes=bytes_by_date(list_inputs(spec, [date], Storage()))[date] // 2 + 1)
    assert len(shards) > 1
    splits = [split_file(f, spec, Storage(), shards[0].buckets, str(tmp_path / "stage"))
              for f in shards[0].files if f.date == date]
    assert all(s.pieces for s in splits)                          # every row group mixes machines: all moved
    staged = [read_shard(with_pieces(s, splits), spec, Storage()).quarantined for s in shards]
    whole = pl.concat([read_shard(s, spec, Storage()).quarantined for s in shards])
    notes = pl.concat(staged)
    assert notes.height == 6 and notes["rows"].to_list() == [20] * 6 and notes["entity"].n_unique() == 6
    assert notes.sort(pl.all()).equals(whole.sort(pl.all()))
    assert notes["reason"].str.starts_with(f"unusable value in column 'b' ({PARTLY_USED}): 20 rows of file "
                                           f"'{source}', 2024-01-02T00:").all()


def test_a_column_a_file_holds_twice_is_an_error_naming_the_file_when_it_is_read_and_no_matter_otherwise(tmp_path):
    """A value column a file holds twice under one name (pandas or pyarrow let a writer do so): which holds the values
    cannot be told - a DataError naming the modality, the file and the column (it was an unexpected KeyError), from
    the shard's read, the driver's check of the columns, staging's split and check-data's footers; a repeated column
    the spec does not read is no matter (its extremes left out)."""
    import datetime as dt
    import pickle

    import pyarrow.parquet as pq

    from dmafn.spec import parse_spec
    from pipelines.check_data import check_data, numeric_extremes
    from pipelines.ingest import read_shard, require_columns
    from pipelines.parquet_files import RepeatedColumn, field_of
    from pipelines.shards import list_inputs
    from pipelines.staging import split_file
    from pipelines.storage import DataError, Storage
    from tests.conftest import tiny_spec_dict

    data = tiny_spec_dict()
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "path": str(tmp_path / "proc")}}
    spec = parse_spec(data)
    day = 1_704_153_600_000_000                                   # 2024-01-02 00:00 UTC
    times = pa.array([day + i * M for i in range(4)], pa.timestamp("us", tz="UTC"))
    keys, temp = pa.array(["a", "b", "a", "b"]), pa.array([1.0, 2.0, 3.0, 4.0])
    path = _folder(tmp_path / "proc" / "date=2024-01-02") / "part-0.parquet"
    pq.write_table(pa.table([keys, times, temp, temp], names=["machine_id", "ts", "temp", "temp"]), path)
    date = dt.date(2024, 1, 2)
    named = rf"modality 'proc' \({path}\): column 'temp' appears 2 times in the file, so which of them holds its " \
            r"values cannot be told - write it once"
    with pytest.raises(DataError, match=named):
        read_shard(_shard(tmp_path, spec, [date]), spec, Storage())
    with pytest.raises(DataError, match=named):
        require_columns(spec, Storage(), list_inputs(spec, [date], Storage()))
    with pytest.raises(DataError, match=named):
        split_file(list_inputs(spec, [date], Storage())[0], spec, Storage(), 2, str(tmp_path / "stage"))
    with pytest.raises(RepeatedColumn, match="column 'temp' appears 2 times"):
        field_of(pq.read_schema(path), "temp")
    again = pickle.loads(pickle.dumps(RepeatedColumn("temp", 2)))          # a Ray task's error, as raised
    assert (again.name, again.count, str(again)) == ("temp", 2, str(RepeatedColumn("temp", 2)))

    pq.write_table(pa.table([keys, times, temp, temp, temp], names=["machine_id", "ts", "temp", "extra", "extra"]),
                   path)
    got = read_shard(_shard(tmp_path, spec, [date]), spec, Storage())
    assert got.tables["proc"].sort("_t")["temp"].to_list() == [1.0, 2.0, 3.0, 4.0]
    assert numeric_extremes(pq.ParquetFile(path)) == {"temp": (1.0, 4.0)}
    pq.write_table(pa.table([keys, times, times, temp], names=["machine_id", "ts", "ts", "temp"]), path)
    (found,) = [d for d in check_data(spec) if getattr(d, "name", None) == "proc"]    # the time held twice
    assert found.problems == [f"{path}: column 'ts' appears 2 times in the file, so which of them holds its values "
                              "cannot be told - write it once"]


def test_a_256_bit_decimal_reads_as_a_float_and_a_nested_entity_key_is_an_error_naming_the_file(tmp_path):
    """A value stored as DECIMAL(40, 6) (Spark writes 256-bit decimals past 38 digits) reads as a float, as a 128-bit
    one does - Polars cannot hold it and panicked (exit 3) -, its row hash by its exact text; an entity column of
    structs (a key nested with others) is a DataError naming the file and the column - it was read as each struct's
    text, every key an entity no other table has."""
    import datetime as dt

    import pyarrow.parquet as pq

    from dmafn.spec import parse_spec
    from pipelines.ingest import check_schema, read_shard
    from pipelines.row_digests import row_hashes
    from pipelines.storage import DataError, Storage
    from tests.conftest import tiny_spec_dict

    data = tiny_spec_dict()
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "path": str(tmp_path / "proc")}}
    spec = parse_spec(data)
    day = 1_704_153_600_000_000                                   # 2024-01-02 00:00 UTC
    times = pa.array([day + i * M for i in range(3)], pa.timestamp("us", tz="UTC"))
    temp = pa.array([1.25, None, 3.5]).cast(pa.decimal256(40, 6))
    rows = pa.table({"machine_id": ["a", "b", "a"], "ts": times, "temp": temp})
    pq.write_table(rows, _folder(tmp_path / "proc" / "date=2024-01-02") / "part-0.parquet")
    got = read_shard(_shard(tmp_path, spec, [dt.date(2024, 1, 2)]), spec, Storage())
    assert got.tables["proc"].sort("_t")["temp"].to_list() == [1.25, 3.5]
    assert got.quarantined["reason"].to_list() == ["unusable value in column 'temp'"]
    hashes = row_hashes(rows)
    assert hashes.n_unique() == 3 and row_hashes(rows.slice(0, 1))[0] == hashes[0]

    nested = pa.schema([("machine_id", pa.struct([("id", pa.string())])), ("ts", times.type), ("temp", pa.float64())])
    with pytest.raises(DataError, match=r"modality 'proc' \(f\.parquet\): entity column 'machine_id' is "
                                        r"struct<id: string>, expected text or a number - a key inside a struct is "
                                        r"read by its dotted name"):
        check_schema(nested, spec, spec.modalities["proc"], "f.parquet")
    check_schema(pa.schema([("machine_id", pa.dictionary(pa.int32(), pa.string())), ("ts", times.type),
                            ("temp", pa.float64())]), spec, spec.modalities["proc"], "f.parquet")   # a categorical


def test_files_not_named_parquet_are_skipped_with_a_warning_that_names_them_and_side_files_quietly(tmp_path, caplog):
    """A date folder as Spark or Hive leave it: side files (`_SUCCESS`, `.crc`) and the files in side folders (a failed
    Spark job's `_temporary` attempts, Hive's `.hive-staging_*`) are skipped quietly; files in other sub-folders (an
    hour's) are read; a data file without the .parquet name (Hive's `000000_0`) is not read, and the warning says so
    by name."""
    import datetime as dt
    import logging

    import pyarrow.fs as pafs

    from pipelines.parquet_files import list_parquet_files
    from pipelines.storage import DateFolder

    folder = tmp_path / "proc" / "date=2024-01-02"
    folder.mkdir(parents=True)
    for name in ("part-0.parquet", "_SUCCESS", ".part-0.parquet.crc", "000000_0", "_temporary/0/part-9.parquet",
                 ".hive-staging_1/part-8.parquet", "hour=13/part-1.parquet", "hour=13/_SUCCESS"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="pipelines.parquet_files"):
        files = list_parquet_files(pafs.LocalFileSystem(), {dt.date(2024, 1, 2): [DateFolder(str(folder))]})
    assert [f.name for f in files] == ["hour=13/part-1.parquet", "part-0.parquet"]
    (record,) = caplog.records
    assert "1 file(s) not named *.parquet are not read (000000_0)" in record.getMessage()
    assert str(folder) in record.getMessage() and "_SUCCESS" not in record.getMessage()


def test_partitions_laid_out_by_year_month_and_day_are_found_level_by_level_and_pruned_to_the_dates_asked(
        tmp_path, caplog, monkeypatch):
    """`partition: year=%Y/month=%m/day=%d`: each level listed in turn; folders that do not fit (month=13, a day
    that no month has, a `backup`) are named in one warning and not read, side folders skipped quietly; given the
    dates wanted, another year's or month's folders are not listed at all. A table where nothing fits is an error
    naming the layout."""
    import datetime as dt
    import logging

    from pipelines import storage as storage_module
    from pipelines.storage import Storage, list_partitions

    layout = "year=%Y/month=%m/day=%d"
    for folder in ("year=2023/month=12/day=31", "year=2024/month=01/day=05", "year=2024/month=01/day=06",
                   "year=2024/month=02/day=30", "year=2024/month=13/day=01", "year=2024/backup", "_tmp/x",
                   "year=2024/month=01/_temporary"):
        (tmp_path / "t" / folder).mkdir(parents=True)
    listed = []
    real = storage_module._list_folders
    monkeypatch.setattr(storage_module, "_list_folders",
                        lambda fs, path, folders: listed.extend(folders) or real(fs, path, folders))
    with caplog.at_level(logging.WARNING, logger="pipelines.storage"):
        found = list_partitions(Storage(), str(tmp_path / "t"), layout)
    assert {d.isoformat(): p.path[len(str(tmp_path / "t")) + 1:] for d, (p,) in found.items()} == {
        "2023-12-31": "year=2023/month=12/day=31", "2024-01-05": "year=2024/month=01/day=05",
        "2024-01-06": "year=2024/month=01/day=06"}
    (record,) = caplog.records
    assert "3 folder(s) not named year=YYYY/month=MM/day=DD (a real date) are not read (year=2024/backup, " \
        "year=2024/month=02/day=30, year=2024/month=13)" in record.getMessage()
    assert len(listed) == 1 + 2 + 3                                   # the table, 2 years, 3 months
    listed.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines.storage"):
        found = list_partitions(Storage(), str(tmp_path / "t"), layout, (dt.date(2024, 1, 6), dt.date(2024, 1, 9)))
    assert list(found) == [dt.date(2024, 1, 6)]
    table = tmp_path / "t"
    assert sorted(listed) == [str(table), str(table / "year=2024"), str(table / "year=2024" / "month=01")]
    assert "backup" in caplog.text and "month=13" in caplog.text and "day=30" not in caplog.text   # not listed
    with pytest.raises(DataError, match=r"no 'YYYY/MM/DD' partitions found"):
        list_partitions(Storage(), str(tmp_path / "t"), "%Y/%m/%d")


def test_date_folders_listed_at_once_come_back_by_date_then_path_and_a_folder_that_cannot_be_listed_is_named(
        tmp_path):
    import datetime as dt

    import pyarrow.fs as pafs

    from pipelines.parquet_files import FOLDER_LISTERS, list_parquet_files
    from pipelines.storage import DataError, DateFolder

    days = [dt.date(2024, 1, 1) + dt.timedelta(days=i) for i in range(FOLDER_LISTERS + 4)]
    folders = {}
    for i, day in enumerate(reversed(days)):                 # created newest first
        folder = tmp_path / f"date={day}"
        (folder / "sub").mkdir(parents=True)
        for name in ("b.parquet", "a.parquet", "sub/c.parquet")[: 1 + i % 3]:
            (folder / name).write_bytes(b"x" * (i + 1))
        folders[day] = [DateFolder(str(folder))]
    files = list_parquet_files(pafs.LocalFileSystem(), folders)
    assert [(f.date, f.name) for f in files] == sorted((f.date, f.name) for f in files)
    assert {f.date for f in files} == {d.isoformat() for d in days} and all(f.mtime_ns for f in files)
    assert any(f.name == "sub/c.parquet" for f in files)
    folders[days[3]] = [DateFolder(str(tmp_path / "gone"))]
    with pytest.raises(DataError, match=r"gone: cannot be listed"):
        list_parquet_files(pafs.LocalFileSystem(), folders)


def test_partition_folders_that_are_not_a_date_are_skipped_with_a_warning_that_names_them(tmp_path, caplog):
    """`date=2024-13-01` (no such date), `date=2024-1-5` (not YYYY-MM-DD), another key or a stray folder are not
    read, and one warning names them (once crashed the job with `month must be in 1..12`); `_delta_log`-like and
    hidden folders and files beside the partitions are skipped quietly."""
    import datetime as dt
    import logging

    from pipelines.storage import DataError, Storage, list_partitions

    for name in ("date=2024-01-02", "date=2024-13-01", "date=2024-1-5", "day=2024-01-03", "backup", "_tmp", ".git"):
        (tmp_path / "proc" / name).mkdir(parents=True)
    (tmp_path / "proc" / "README").write_text("x")
    with caplog.at_level(logging.WARNING, logger="pipelines.storage"):
        parts = list_partitions(Storage(), str(tmp_path / "proc"), "date")
    assert list(parts) == [dt.date(2024, 1, 2)] and parts[dt.date(2024, 1, 2)][0].path.endswith("/proc/date=2024-01-02")
    (record,) = caplog.records
    assert (f"{tmp_path / 'proc'}: 4 folder(s) not named date=YYYY-MM-DD (a real date) are not read (backup, "
            "date=2024-1-5, date=2024-13-01, ...)") in record.getMessage()
    (tmp_path / "other" / "date=2024-02-30").mkdir(parents=True)
    with pytest.raises(DataError, match="no 'date=YYYY-MM-DD' partitions found"):
        list_partitions(Storage(), str(tmp_path / "other"), "date")


def test_a_table_read_by_a_modality_and_its_context_is_listed_once(tmp_path, caplog):
    """A context view reads its parent's table: `list_inputs` lists the folder once (one warning for a file not
    named *.parquet, one LIST per folder on S3) and gives both modalities the same files."""
    import datetime as dt
    import logging

    from dmafn.spec import parse_spec
    from pipelines.shards import list_inputs
    from pipelines.storage import Storage
    from tests.conftest import tiny_spec_dict

    folder = tmp_path / "proc" / "date=2024-01-02"
    folder.mkdir(parents=True)
    for name in ("part-0.parquet", "000000_0"):
        (folder / name).write_bytes(b"x")
    data = tiny_spec_dict()
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "path": str(tmp_path / "proc"),
                                   "context": {"window": "10min"}}}
    spec = parse_spec(data)
    with caplog.at_level(logging.WARNING, logger="pipelines.parquet_files"):
        files = list_inputs(spec, [dt.date(2024, 1, 2)], Storage())
    assert sorted((f.modality, f.path.rsplit("/", 1)[1]) for f in files) == [
        ("proc", "part-0.parquet"), ("proc_context", "part-0.parquet")]
    assert len(caplog.records) == 1 and "000000_0" in caplog.records[0].getMessage()


def test_operating_state_is_each_level_from_its_entitys_own_mean_and_absent_with_its_modality(tiny_spec):
    from dataclasses import replace

    aligned = aligned_rows(tiny_spec)
    stats = StatisticsFitter(tiny_spec).add(aligned).result()
    feats = featurize(aligned, tiny_spec, stats)
    # tabular and series levels, a series' swing, in order, then how fast each modality's state rises
    assert feats.state_owners == ("proc", "vib", "vib", "proc.rising", "vib.rising")
    before = featurize(aligned, tiny_spec, {k: v for k, v in stats.items() if k != "state_speed"})
    assert before.state_owners == ("proc", "vib", "vib")          # a version before 2026-12-07: no speed
    np.testing.assert_array_equal(before.state, feats.state[:, :3])
    proc, present = feats.state[:, 0], feats.mask[:, 0]
    assert np.isnan(proc[~present]).all() and np.isfinite(proc[present]).all()
    keys = np.asarray(aligned.column("machine_id").to_pylist())
    for key in ("a", "b"):                                              # pumps 100 apart: each about its own mean
        assert abs(proc[present & (keys == key)].mean()) < 1e-5
    assert np.isnan(feats.state[~present, 3]).all() and np.isfinite(feats.state[present, 3]).all()
    assert feats.rows(np.array([0, 1])).state.shape == (2, 5)
    centered = replace(tiny_spec, modalities={**tiny_spec.modalities,
                                              "vib": replace(tiny_spec.modalities["vib"], transform="centered")},
                       model=replace(tiny_spec.model, state_speed_us=0))
    stats = StatisticsFitter(centered).add(aligned).result()
    assert featurize(aligned, centered, stats).state_owners == ("proc", "vib")   # a drift-free series: its swing only


def test_state_speed_is_the_distance_from_the_recent_average_within_each_entitys_date_and_carries_over_batches():
    """`state_speed`: 0 at a group's first tick, then the root mean square of each column's rise above the EWMA of
    the values before it (a fall counts 0); an absent value leaves the average as it was; groups apart; a group cut
    into batches with a carry gives what it gives at once."""
    from dmafn.features import state_speed

    z = np.array([[0.0, 0.0], [1.0, 3.0], [np.nan, np.nan], [1.0, np.nan], [5.0, 5.0], [2.0, 0.0], [2.0, 5.0]])
    groups = np.array(["a", "a", "a", "a", "b", "b", "b"])
    rank = np.arange(7)
    speed = state_speed(z, groups, rank, 0.5)
    # a: averages (0, 0) -> (0.5, 1.5) after tick 1; tick 2 absent; tick 3: 1 - 0.5 (the other column absent)
    # b: (5, 5); tick 5 falls by (3, 5): no rise; average (3.5, 2.5), so tick 6 falls by 1.5 and rises by 2.5
    np.testing.assert_allclose(speed, [0.0, np.sqrt((1 + 9) / 2), np.nan, 0.5, 0.0, 0.0, 2.5 / np.sqrt(2)])
    shuffled = np.array([3, 0, 5, 2, 6, 1, 4])                    # rows in any order: time is the rank
    np.testing.assert_allclose(state_speed(z[shuffled], groups[shuffled], rank[shuffled], 0.5), speed[shuffled])
    carry: dict = {}
    parts = [state_speed(z[rows], groups[rows], rank[rows], 0.5, carry) for rows in (slice(0, 2), slice(2, 7))]
    np.testing.assert_allclose(np.concatenate(parts), speed)
    assert set(carry) == {"a", "b"}


def test_model_state_speed_sets_the_average_each_tick_moves_by():
    """`model.state_speed` (a duration, default 5 min; false: none) is saved as the EWMA weight of one tick."""
    from dmafn.spec import SpecError, parse_spec
    from tests.conftest import tiny_spec_dict

    data = tiny_spec_dict()
    for given, weight in (({}, 1 - np.exp(-1 / 5)), ({"state_speed": "10min"}, 1 - np.exp(-1 / 10)),
                          ({"state_speed": False}, None)):
        spec = parse_spec({**data, "model": {**data.get("model", {}), **given}})
        assert StatisticsFitter(spec).add(aligned_rows(spec)).result().get("state_speed") == (
            None if weight is None else pytest.approx(weight))
        assert parse_spec(spec.to_dict()).model == spec.model                 # saved with a version as it was
    with pytest.raises(SpecError, match="state_speed"):
        parse_spec({**data, "model": {"state_speed": "soon"}})


def test_statistics_cut_to_some_entities_score_them_as_the_whole_statistics_do():
    """Statistics split into the fleet's part and one set of parts per entity (`split_entity_statistics`, how a
    model version stores them) join back to the whole; joined with some entities only (a scoring task's entity
    bucket), normalisation moments, relation intercepts and ranges of the others are left out, the fleet's parts
    kept, and the bucket's entities featurize exactly as with the whole statistics. Only string and integer keys
    are cut (a key's text must be the same as Polars and Python write it)."""
    from dataclasses import replace

    from dmafn.features import join_entity_statistics, split_entity_statistics
    from dmafn.spec import parse_spec
    from pipelines.score import keys_sliceable
    from tests.conftest import tiny_spec_dict

    data = tiny_spec_dict()
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "columns": ["temp", "pres"],
                                   "context": {"window": "10min"}}, "vib": data["modalities"]["vib"]}
    spec = parse_spec(data)
    spec = replace(spec, model=replace(spec.model, normalization="entity"))
    rng = np.random.default_rng(5)

    def rows(key, n, offset):
        table = _cross_rows(spec, n, rng)
        for name in ("proc__temp", "proc__pres"):
            table = table.set_column(table.schema.get_field_index(name), name,
                                     pa.array(np.asarray(table.column(name)) + offset))
        return table.set_column(0, "machine_id", pa.array([key] * n))

    train = pa.concat_tables([rows(k, 300, o) for k, o in (("a", 0.0), ("b", 5.0), ("c", -3.0))])
    whole = StatisticsFitter(spec).add(train).result()
    fleet, entities = split_entity_statistics(whole)
    assert set(entities) == {"a", "b", "c"} and fleet["modalities"]["proc"]["entity"] == {}
    assert fleet["relations"]["proc_context"]["ranges"]["entities"] == {}
    assert join_entity_statistics(fleet, entities.items()) == whole
    cut = join_entity_statistics(fleet, [(k, entities[k]) for k in ("c", "a")])
    assert set(cut["modalities"]["proc"]["entity"]) == {"a", "c"}
    assert cut["modalities"]["proc"]["global"] == whole["modalities"]["proc"]["global"]
    relation = cut["relations"]["proc_context"]
    for key in ("channels", "cross_channels"):
        assert all(set(ch["entity_intercepts"]) == {"a", "c"} for ch in relation[key] if ch is not None)
    for key in ("ranges", "cross_ranges"):
        assert set(relation[key]["entities"]) == {"a", "c"}
        assert relation[key]["fleet"] == whole["relations"]["proc_context"][key]["fleet"]
    assert set(whole["modalities"]["proc"]["entity"]) == {"a", "b", "c"}       # the whole is left as it was
    new = pa.concat_tables([rows("c", 50, -3.0), rows("a", 50, 0.0)])
    full, part = featurize(new, spec, whole), featurize(new, spec, cut)
    for m in spec.modalities:
        np.testing.assert_array_equal(full.inputs[m], part.inputs[m])
    np.testing.assert_array_equal(full.relation_errors, part.relation_errors)
    np.testing.assert_array_equal(full.state, part.state)
    assert keys_sliceable(spec, {"proc": pa.schema([("machine_id", pa.string())]),
                                 "vib": pa.schema([("machine_id", pa.int64())])})
    assert not keys_sliceable(spec, {"proc": pa.schema([("machine_id", pa.bool_())])})
    categorical = pa.dictionary(pa.int32(), pa.string())          # pandas' and Polars' categorical columns
    assert keys_sliceable(spec, {"proc": pa.schema([("machine_id", categorical)])})
    assert not keys_sliceable(spec, {"proc": pa.schema([("machine_id", pa.dictionary(pa.int32(), pa.float64()))])})
    # a sliceable key is the same text to the statistics (Python) and to the bucket split (Polars)
    from dmafn.features import entity_key
    from pipelines.shards import bucket_numbers, bucket_of

    for column in (pa.array(["pump-07", "b", "pump-07", "é"]).dictionary_encode(), pa.array([12, -3, 12, 7])):
        table = pa.table({"machine_id": column})
        assert bucket_numbers(pl.from_arrow(table), ["machine_id"], 5).to_list() == \
            [bucket_of(k, 5) for k in entity_key(table, ["machine_id"])]


def test_the_entity_file_gives_every_entitys_parts_back_exactly():
    """`entity_file` keeps numbers in Arrow's own types where they come back exactly (float64, NaN included) and
    JSON text where they would not (an int beside floats, a None, mixed lists), named in its metadata; an entity
    without a part at a place gets none back."""
    import json

    import pyarrow.parquet as pq

    from pipelines.statistics import EntityStatistics, entity_file, entity_parts, entity_table

    parts = {"b": {"x": 1.5, "y": {"mean": [1.0, 2.0], "count": 3.0}, "z": [[1.0], [2.0]], "n": None, "m": 1},
             "a": {"x": float("nan"), "m": 2.5, "q": [1, "s"]}}
    rows = pq.read_table(pa.BufferReader(entity_file(entity_table(parts))))
    assert rows.column_names == ["key", "m", "n", "q", "x", "y", "z"]
    assert json.loads(rows.schema.metadata[b"dmafn.json_columns"]) == ["m", "n", "q"]
    assert rows.schema.field("x").type == pa.float64()
    assert rows.schema.field("z").type == pa.list_(pa.list_(pa.float64()))
    back = dict(entity_parts(rows))
    assert json.dumps(back, sort_keys=True) == json.dumps(parts, sort_keys=True)     # NaN, 1 vs 1.0, None kept
    assert set(back["a"]) == {"x", "m", "q"} and type(back["b"]["m"]) is int
    fleet = {"modalities": {"p": {"global": {"mean": [0.0]}, "entity": {}}}}
    split = EntityStatistics(fleet, rows=pq.read_table(pa.BufferReader(entity_file(entity_table(
        {"e1": {"modalities/p/entity": {"mean": [1.0]}}, "e2": {"modalities/p/entity": {"mean": [2.0]}}})))))
    assert split.keys() == ["e1", "e2"]
    assert split.for_keys(["e2", "e9"])["modalities"]["p"]["entity"] == {"e2": {"mean": [2.0]}}
    assert split.whole["modalities"]["p"]["entity"] == {"e1": {"mean": [1.0]}, "e2": {"mean": [2.0]}}
    assert fleet["modalities"]["p"]["entity"] == {}                              # the fleet's part is left as it was


def test_entity_tables_of_buckets_join_into_one_that_gives_every_part_back():
    """Tables of disjoint entities (one per entity bucket) join sorted by key: a place one bucket typed and
    another kept as JSON, or typed otherwise (an int beside floats), is JSON text in the joined table; a place a
    bucket lacks is null there; an empty bucket adds nothing."""
    import json

    from pipelines.statistics import entity_parts, entity_rows, entity_table

    buckets = [{"c": {"m": 2.5, "x": 1.0}, "a": {"m": 0.5, "x": 3.0, "n": None}},
               {"b": {"m": 1, "x": 2.0, "w": [1.0, 2.0]}}, {}]
    rows = entity_rows([entity_table(b) for b in buckets])
    assert rows.column("key").to_pylist() == ["a", "b", "c"]
    assert json.loads(rows.schema.metadata[b"dmafn.json_columns"]) == ["m", "n"]
    assert rows.schema.field("x").type == pa.float64() and rows.schema.field("w").type == pa.list_(pa.float64())
    back = dict(entity_parts(rows))
    assert json.dumps(back, sort_keys=True) == json.dumps({k: v for b in buckets for k, v in b.items()}, sort_keys=True)
    assert type(back["b"]["m"]) is int and "w" not in back["a"]
    assert entity_rows([entity_table({})]).num_rows == 0


def _fit_in_buckets(fitter, buckets):
    """As `pipelines.train.fit_statistics` does across tasks: split, each bucket's parts merged apart, the
    fleet's part from the buckets' totals, then each bucket's entities under it."""
    from dmafn.features import StatisticsTotals, join_entity_statistics

    fleet, parts = fitter.split(buckets, lambda key: sorted("abcdefgh").index(key[0]) % buckets)
    merged = [StatisticsFitter(fitter.spec).merge(p) for p in parts]           # as a bucket's task receives them
    totals = StatisticsTotals()
    for m in merged:
        totals.merge(m.totals())
    shared = StatisticsFitter(fitter.spec).merge(fleet).fleet_result(totals)
    assert all(not entry.get("entity") for entry in shared["modalities"].values())      # no entity's part in it
    entities = {}
    for m in merged:
        entities.update(m.entity_statistics(shared))
    return fleet, parts, join_entity_statistics(shared, entities.items())


def test_statistics_fitted_in_entity_buckets_are_the_fleets_statistics_fitted_whole(auto_spec):
    """A fitter split into the fleet's part and entity buckets' parts (each merged apart, as training's tasks do)
    gives the statistics of the whole fitter: relation weights and residuals from the buckets' totals, each
    entity's moments, intercepts and ranges, the 'auto' choice from every entity's drift; an entity with one row
    gets no intercept or range, and a bucket without any entity adds nothing. Merging the parts back gives the
    fitter again."""
    from dmafn.spec import parse_spec
    from tests.conftest import tiny_spec_dict

    data = tiny_spec_dict()
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "columns": ["temp", "pres"],
                                   "context": {"window": "10min"}}, "vib": data["modalities"]["vib"]}
    spec = parse_spec(data)
    rows = _cross_rows(spec, 600, np.random.default_rng(5))
    keys = ["a", "b", "c", "d", "e"] * 119 + ["a", "b", "c", "d", "f"]                 # 'f' has one row
    rows = rows.set_column(0, "machine_id", pa.array(keys))
    fitter = StatisticsFitter(spec).add(rows)
    whole = fitter.result()
    fleet, parts, bucketed = _fit_in_buckets(fitter, 7)                            # bucket 6 is empty
    same_statistics(whole, bucketed)
    intercepts = bucketed["relations"]["proc_context"]["cross_channels"][0]["entity_intercepts"]
    assert sorted(intercepts) == ["a", "b", "c", "d", "e"]                            # not 'f': one row
    assert sorted(bucketed["relations"]["proc_context"]["ranges"]["entities"]) == ["a", "b", "c", "d", "e"]
    assert not parts[6].entity_["proc"]["level"] and sorted(parts[5].entity_["proc"]["level"]) == ["f"]
    back = StatisticsFitter(spec).merge(fleet)
    for p in parts:
        back.merge(p)
    same_statistics(whole, back.result(), rtol=0)

    series = _series_rows(auto_spec, level=lambda i: 10.0 + 3.0 * i, entities=("a", "b", "c"))
    auto = StatisticsFitter(auto_spec).add(series)
    whole = auto.result()
    assert whole["modalities"]["vib"]["channel_transforms"] == ["centered", "level"]
    same_statistics(whole, _fit_in_buckets(auto, 2)[2])


def test_entity_places_and_left_out_counts_of_a_fleet_part_fitted_before():
    """`entity_places` names where statistics keep parts per entity (none for a fleet of images and text only);
    `with_left_out` puts another fit's refit counts on a fleet part fitted before (what `dmafn enroll` fits under)."""
    from dmafn.features import entity_places, with_left_out

    fleet = {"modalities": {"proc": {"global": {}, "entity": {}}, "img": {"kind": "image"}},
             "relations": {"ctx": {"parent": "proc", "channels": [{"entity_intercepts": {}}, None],
                                   "ranges": {"fleet": [[0], [1]], "entities": {}}, "left_out": 7,
                                   "cross_channels": [{"entity_intercepts": {}}, None], "cross_left_out": 3}}}
    assert entity_places(fleet) == ["modalities/proc/entity", "relations/ctx/channels/0/entity_intercepts",
                                    "relations/ctx/cross_channels/0/entity_intercepts", "relations/ctx/ranges/entities"]
    assert entity_places({"modalities": {"img": {"kind": "image"}, "log": {"vocabulary": {}}}}) == []
    refit = with_left_out(fleet, {("relations_", "ctx"): 2})
    assert (refit["relations"]["ctx"]["left_out"], "cross_left_out" in refit["relations"]["ctx"]) == (2, False)
    assert fleet["relations"]["ctx"]["left_out"] == 7                       # the fleet part given is not changed
    first = with_left_out(fleet, {})                                         # a first fit: nothing left out yet
    assert not {"left_out", "cross_left_out"} & set(first["relations"]["ctx"])
    assert with_left_out({"modalities": {}}, {("relations_", "ctx"): 1}) == {"modalities": {}}


def test_a_modality_whose_files_name_the_time_and_entity_otherwise_reads_as_if_they_were_the_specs(tmp_path):
    """A table landed by another team names its time and entity columns its own way (`event_time`, `asset`): with
    the modality's `time` and `entity` it reads as a twin lake written with the spec's names does - its rows, look-back
    day, quarantine (the reasons naming its own columns), entity buckets, split pieces, schema checks, profile and
    check-data alike; a missing renamed column is named as the file names it."""
    import datetime as dt

    import pyarrow.parquet as pq

    from dmafn.spec import parse_spec
    from pipelines.check_data import check_data
    from pipelines.ingest import read_shard
    from pipelines.profile import profile
    from pipelines.staging import split_file, with_pieces
    from pipelines.statistics import keys_sliceable
    from pipelines.storage import Storage
    from tests.conftest import tiny_spec_dict

    day, n = 1_704_153_600_000_000, 120                           # 2024-01-02 00:00 UTC
    machines = [f"pump-{i % 6}" for i in range(n)]                # every row group mixes machines
    machines[7] = None
    ts = [day + i * 20_000_000 for i in range(n)]
    temp = np.linspace(0, 1, n)
    temp[11] = np.nan
    msgs = [f"line {i}" for i in range(n)]

    def lake(root, time, entity) -> dict:
        for date, shift in (("2024-01-01", n * 20_000_000), ("2024-01-02", 0)):   # the day before: its last 40 min
            times = pa.array([None if i == 13 and not shift else t - shift for i, t in enumerate(ts)],
                             pa.timestamp("us", tz="UTC"))
            for table, rows in (("proc", {"temp": temp}), ("logs", {"msg": msgs})):
                (root / table / f"date={date}").mkdir(parents=True)
                pq.write_table(pa.table({entity: machines, time: times, **rows}),
                               root / table / f"date={date}" / "part-0.parquet", row_group_size=25)
        data = tiny_spec_dict()
        data["modalities"] = {"proc": {**data["modalities"]["proc"], "path": str(root / "proc"),
                                       "context": {"window": "1h"}},
                              "logs": {**data["modalities"]["logs"], "path": str(root / "logs")}}
        data["score"] = {"output": str(root / "scores")}
        data["train"] = {"start": "2024-01-01", "end": "2024-01-02"}
        return data

    plain = parse_spec(lake(tmp_path / "plain", "ts", "machine_id"))
    data = lake(tmp_path / "own", "event_time", "asset")
    data["modalities"]["proc"].update(time="event_time", entity="asset")
    data["modalities"]["logs"].update(time="event_time", entity=["asset"])
    own = parse_spec(data)
    date = dt.date(2024, 1, 2)
    for spec in (plain, own):
        assert len(_shards(spec, [date])) == 1
    got, want = (read_shard(_shard(tmp_path, spec, [date]), spec, Storage()) for spec in (own, plain))
    assert set(got.tables) == set(want.tables) == {"proc", "proc_context", "logs"}
    for name in want.tables:
        assert got.tables[name].columns == want.tables[name].columns
        assert got.tables[name].sort("machine_id", "_t").equals(want.tables[name].sort("machine_id", "_t")), name
    assert got.tables["proc"]["_t"].min() < day                   # the look-back day's rows, pruned by event_time
    assert got.present.sort(pl.all()).equals(want.present.sort(pl.all()))
    renamed = lambda frame: frame.with_columns(pl.col("reason").str.replace("'asset'", "'machine_id'")  # noqa: E731
                                               .str.replace("'event_time'", "'ts'"))
    assert renamed(got.quarantined).sort(pl.all()).equals(want.quarantined.sort(pl.all()))
    assert sorted(set(got.quarantined["reason"])) == [
        "null entity column 'asset'", "null time column 'event_time'", "unusable value in column 'temp'"]

    # entity buckets, and the split pieces of files that mix machines: every bucket reads what the twin's does
    size = sum(f.stat().st_size for f in (tmp_path / "own").rglob("*.parquet"))
    shards = {name: _shards(spec, [date], shard_bytes=size // 6) for name, spec in (("own", own), ("plain", plain))}
    assert len(shards["own"]) == len(shards["plain"]) > 1
    files = sorted({f for s in shards["own"] for f in s.files if f.date == date}, key=lambda f: (f.modality, f.path))
    splits = [split_file(f, own, Storage(), shards["own"][0].buckets, str(tmp_path / "stage" / str(i)))
              for i, f in enumerate(files)]
    assert all(s.pieces for s in splits)
    assert {"asset", "event_time"} <= set(pq.ParquetFile(splits[0].pieces[0][0].path).schema_arrow.names)
    for mine, twin in zip(shards["own"], shards["plain"]):
        got, want = read_shard(with_pieces(mine, splits), own, Storage()), read_shard(twin, plain, Storage())
        for name in want.tables:
            assert got.tables[name].sort("machine_id", "_t").equals(want.tables[name].sort("machine_id", "_t"))
        assert renamed(got.quarantined).sort(pl.all()).equals(want.quarantined.sort(pl.all()))

    assert keys_sliceable(own, {"proc": pq.read_schema(files[-1].path)})
    assert profile(own, dt.date(2024, 1, 1), date, use_ray=False).equals(
        profile(plain, dt.date(2024, 1, 1), date, use_ray=False))
    assert [d.problems for d in check_data(own)] == [[], [], []]
    bad = tmp_path / "own" / "logs" / "date=2024-01-02" / "part-1.parquet"
    pq.write_table(pa.table({"machine_id": ["a"], "event_time": pa.array([day], pa.timestamp("us")), "msg": ["x"]}),
                   bad)
    with pytest.raises(DataError, match=r"part-1\.parquet\): column 'asset' not found"):
        read_shard(_shard(tmp_path, own, [date]), own, Storage())
    assert "column 'asset' not found" in " ".join(p for d in check_data(own) for p in d.problems)


@pytest.mark.parametrize("proc_keys,log_keys", [("int64", "string"), ("dictionary", "string"),
                                                ("dictionary", "int64"), ("int32", "int64"), ("large", "string")])
def test_entity_keys_stored_differently_by_two_tables_meet_as_one_entity(tmp_path, proc_keys, log_keys):
    """Two teams' tables key one machine differently - 17 in one, '17' in the other; a pandas categorical in one, a
    plain string in the other: the machine's rows meet on its ticks (integers against text read as text, as the
    model's per-entity statistics key them; a categorical as its strings; integers of two widths as they are)."""
    import datetime as dt

    import pyarrow.parquet as pq

    from dmafn.spec import parse_spec
    from pipelines.align import data_ticks
    from pipelines.check_data import check_data
    from pipelines.ingest import entity_casts, read_shard, require_columns
    from pipelines.shards import list_inputs, plan_shards
    from pipelines.storage import Storage
    from tests.conftest import tiny_spec_dict

    stored = {"int64": pa.array([17, 4, 17], pa.int64()), "int32": pa.array([17, 4, 17], pa.int32()),
              "string": pa.array(["17", "4", "17"]), "large": pa.array(["17", "4", "17"], pa.large_string()),
              "dictionary": pa.array(["17", "4", "17"]).dictionary_encode()}
    day = 1_704_153_600_000_000                                   # 2024-01-02 00:00 UTC
    ts = pa.array([day + i * M for i in range(3)], pa.timestamp("us", tz="UTC"))
    for table, keys, rows in (("proc", proc_keys, {"temp": [1.0, 2.0, 3.0]}), ("logs", log_keys, {"msg": ["a"] * 3})):
        (tmp_path / table / "date=2024-01-02").mkdir(parents=True)
        pq.write_table(pa.table({"machine_id": stored[keys], "ts": ts, **rows}),
                       tmp_path / table / "date=2024-01-02" / "part-0.parquet")
    data = tiny_spec_dict()
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "path": str(tmp_path / "proc")},
                          "logs": {**data["modalities"]["logs"], "path": str(tmp_path / "logs")}}
    spec, date = parse_spec(data), dt.date(2024, 1, 2)
    files = list_inputs(spec, [date], Storage())
    casts = entity_casts(spec, require_columns(spec, Storage(), files))
    integers = {proc_keys, log_keys} & {"int64", "int32"}
    assert casts == ((("machine_id", "text"),) if integers and {proc_keys, log_keys} - integers else
                     (("machine_id", "integer"),) if len(integers) == 2 else ())
    (shard,) = plan_shards(spec, [date], files, key_casts=casts)
    got = read_shard(shard, spec, Storage())
    aligned = align(data_ticks(got.tables, got.present, spec, [date]), got.tables, spec)
    assert aligned.schema["machine_id"] == (pl.String if not integers or casts[0][1] == "text" else pl.Int64)
    seventeen = aligned.filter(pl.col("machine_id").cast(pl.String) == "17")
    assert seventeen.height == 5 and seventeen["proc__present"].sum() == 5 and seventeen["logs__present"].sum() == 4
    assert aligned["machine_id"].cast(pl.String).unique().sort().to_list() == ["17", "4"]
    notes = {d.name: d.notes for d in check_data(spec)[:2]}          # validate --check-data says how they are read
    reading = {"text": "read as text in every table, so that 17 and '17' are one entity",
               "integer": "read as 64-bit integers in every table"}
    assert notes == ({"proc": [], "logs": []} if not casts else {
        "proc": [f"entity 'machine_id' stored as {stored[proc_keys].type} ({stored[log_keys].type} in logs): "
                 f"{reading[casts[0][1]]}"],
        "logs": [f"entity 'machine_id' stored as {stored[log_keys].type} ({stored[proc_keys].type} in proc): "
                 f"{reading[casts[0][1]]}"]})


def test_entity_keys_a_table_stores_otherwise_in_its_newer_files_meet_as_one_entity(tmp_path):
    """A writer that changed: the process table keyed machine 17 as an integer until yesterday and as text since. The
    job reads each modality's first and newest file's schema (`require_columns`), so the keys are read as text in
    every file and the look-back day's rows meet today's; `validate --check-data` notes it."""
    import datetime as dt

    import pyarrow.parquet as pq

    from dmafn.spec import parse_spec
    from pipelines.check_data import check_data
    from pipelines.ingest import entity_casts, read_shard, require_columns
    from pipelines.shards import list_inputs, plan_shards
    from pipelines.storage import Storage
    from tests.conftest import tiny_spec_dict

    day = 1_704_153_600_000_000                                   # 2024-01-02 00:00 UTC
    for date, keys, at in (("2024-01-01", pa.array([17], pa.int64()), day - M), ("2024-01-02", pa.array(["17"]), day)):
        pq.write_table(pa.table({"machine_id": keys, "ts": pa.array([at], pa.timestamp("us", tz="UTC")),
                                 "temp": [1.0]}), _folder(tmp_path / "proc" / f"date={date}") / "part-0.parquet")
    data = tiny_spec_dict()
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "path": str(tmp_path / "proc")}}
    spec, date = parse_spec(data), dt.date(2024, 1, 2)
    files = list_inputs(spec, [date], Storage())
    schemas = require_columns(spec, Storage(), files)
    assert [str(s.field("machine_id").type) for s in schemas["proc"]] == ["int64", "string"]
    casts = entity_casts(spec, schemas)
    assert casts == (("machine_id", "text"),)
    (shard,) = plan_shards(spec, [date], files, key_casts=casts)
    got = read_shard(shard, spec, Storage())
    assert got.tables["proc"].sort(TIME).rows() == [("17", day - M, 1.0), ("17", day, 1.0)]
    assert check_data(spec)[0].notes == [
        "entity 'machine_id' stored as int64 and string in its files: read as text in every table, so that 17 and "
        "'17' are one entity"]


def _damaged_file(path, rows_per_group=600, groups=3, start_us=1_704_153_600_000_000):
    """A process file of `groups` row groups (machines a, b alternating, a row every 20 s from `start_us`; small
    pages, checksummed) whose `temp` pages near the end of row group 1 are damaged; returns the table as written."""
    import pyarrow.parquet as pq

    n = rows_per_group * groups
    table = pa.table({"machine_id": ["a", "b"] * (n // 2), "ts": pa.array(
        np.arange(n) * 20_000_000 + start_us, pa.timestamp("us", tz="UTC")),
        "temp": np.random.default_rng(0).normal(size=n)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, write_page_checksum=True, compression="none", row_group_size=rows_per_group,
                   data_page_size=1_000, use_dictionary=False, write_batch_size=100)
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(2)
    assert chunk.path_in_schema == "temp"
    data = bytearray(path.read_bytes())
    at = chunk.data_page_offset + chunk.total_compressed_size - 40         # inside the chunk's last page
    data[at:at + 8] = bytes(b ^ 0x5A for b in data[at:at + 8])
    path.write_bytes(bytes(data))
    return table


def test_a_damaged_row_group_fails_its_date_or_is_left_out_whole_and_named_once_with_unreadable_files_skip(
        tmp_path, tiny_spec, monkeypatch, caplog):
    """A row group whose pages do not decode from its bytes fetched anew (`DamagedRowGroup`, a DataError naming file,
    row group and column) fails its date by default; with `unreadable_files: skip` it is left out whole - what its
    earlier parts added undone (read in parts here) - and named once over the entity buckets with its rows, which
    the date counts as read; the other row groups are read. Training warns of it, staging leaves the file unsplit,
    the row digests have none."""
    import datetime as dt
    import pickle
    from dataclasses import replace

    import pyarrow.parquet as pq

    import pipelines.parquet_files as parquet_files
    from pipelines.ingest import read_shard, unusable_reasons
    from pipelines.parquet_files import DamagedRowGroup
    from pipelines.row_digests import date_digests
    from pipelines.shards import Shard, list_inputs
    from pipelines.staging import split_file
    from pipelines.storage import Storage
    from pipelines.train import aligned_batches, left_out_files

    path = tmp_path / "proc" / "date=2024-01-02" / "part-0.parquet"
    table = _damaged_file(path)
    spec = _proc_spec(tiny_spec, tmp_path / "proc")
    date = dt.date(2024, 1, 2)
    files = tuple(list_inputs(spec, [date], Storage()))
    with pytest.raises(DamagedRowGroup, match=r"part-0\.parquet: not a readable Parquet file \(row group 1, column "
                                              r"'temp': .*checksum"):
        read_shard(Shard((date,), 0, 1, files), spec, Storage())
    again = pickle.loads(pickle.dumps(DamagedRowGroup("/a.parquet", 1, 600, "temp", "bad")))  # as a Ray task raises
    assert (type(again), str(again), again.rows) == (DamagedRowGroup, "/a.parquet: not a readable Parquet file "
                                                                      "(row group 1, column 'temp': bad)", 600)
    skip = replace(spec, unreadable_files="skip")
    monkeypatch.setattr(parquet_files, "PART_BYTES", 2_000)      # each row group read in parts: some before the damage
    got = [read_shard(Shard((date,), b, 2, files), skip, Storage()) for b in (0, 1)]
    read = pl.concat([g.tables["proc"] for g in got if "proc" in g.tables]).sort("_t")
    kept = np.r_[0:600, 1200:1800]
    assert read["temp"].to_list() == table["temp"].to_numpy()[kept].tolist()       # row groups 0 and 2, whole
    quarantined = pl.concat([g.quarantined for g in got])
    assert quarantined.select("entity", "_t", "date", "source", "rows").rows() == [
        (None, None, "2024-01-02", "proc", 600)]
    (reason,) = quarantined["reason"]
    assert reason.startswith(f"damaged Parquet pages in '{path}' row group 1, column 'temp': ") and reason.endswith(
        " - its 600 rows left out (unreadable_files: skip)") and "checksum" in reason
    assert sum(g.rows_read["2024-01-02"] for g in got) == 1800
    assert sum(g.usable_rows["2024-01-02"]["proc"] for g in got) == 1200
    assert sum(g.row_digests["2024-01-02"]["proc"].rows for g in got) == 1200
    assert unusable_reasons(quarantined) == {"proc: damaged Parquet pages": 600}
    caplog.set_level("WARNING")
    counts = aligned_batches(Shard((date,), 0, 1, files), skip, Storage()).counts     # training's passes
    assert counts == {"proc": 600, reason: 1}
    assert left_out_files(counts, "training days 2024-01-02..2024-01-02") == {"proc": 600}
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"training days 2024-01-02..2024-01-02: {reason}"]
    assert split_file(files[0], skip, Storage(), 2, str(tmp_path / "staged")).pieces is None
    with pytest.raises(DamagedRowGroup):
        split_file(files[0], spec, Storage(), 2, str(tmp_path / "staged"))
    assert date_digests(skip, list(files), {"proc": spec.columns_read(spec.modalities["proc"])}) == {"proc": None}
    # the next day's first ticks read it (look-back): named under that date, as read around it
    nxt = tmp_path / "proc" / "date=2024-01-03" / "part-0.parquet"
    _write(nxt, pa.table({"machine_id": ["a"], "ts": pa.array([1_704_240_000_000_000], pa.timestamp("us", tz="UTC")),
                          "temp": [1.0]}))
    monkeypatch.setattr(parquet_files, "PART_BYTES", 16_000_000)
    reach = replace(skip, modalities={"proc": replace(skip.modalities["proc"], tolerance_us=86_400_000_000)})
    around = read_shard(Shard((dt.date(2024, 1, 3),), 0, 1, tuple(list_inputs(reach, [dt.date(2024, 1, 3)],
                                                                               Storage()))), reach, Storage())
    assert around.quarantined["reason"].to_list() == [reason.replace(
        "'temp': ", "'temp' of 2024-01-02 (read around the date): ")] and around.rows_read == {"2024-01-03": 1}
    assert unusable_reasons(around.quarantined) == {"proc: damaged Parquet pages read around the date": 1}


def test_a_damaged_row_group_of_a_file_spanning_two_dates_is_counted_under_one(tmp_path, tiny_spec):
    """A file listed under each date its rows span (a Delta table not partitioned by date, `InputFile.span`) whose
    row group across midnight does not decode: each date reads it (its times reach both), but its rows are counted
    once - under the date of its earliest time by the statistics - and noted under the other as counted there (1
    row, folded as `DAMAGED_ELSEWHERE`); before, each date counted all its rows. Without statistics, the span's first
    date counts them."""
    import datetime as dt
    from dataclasses import replace

    from pipelines.ingest import DAMAGED_ELSEWHERE, damaged_owner_date, read_shard, unusable_reasons
    from pipelines.parquet_files import open_parquet
    from pipelines.score import left_out_input
    from pipelines.shards import InputFile, Shard
    from pipelines.storage import Storage

    path = tmp_path / "clustered" / "part-0.parquet"    # 20:00 on 01-01 to 06:00 on 01-02; row group 1 23:20-02:40
    _damaged_file(path, start_us=1_704_153_600_000_000 - 4 * 3_600_000_000)
    spec = replace(_proc_spec(tiny_spec, tmp_path / "clustered"), unreadable_files="skip")
    days = (dt.date(2024, 1, 1), dt.date(2024, 1, 2))
    got = {d: read_shard(Shard((d,), 0, 1, (InputFile("proc", d, str(path), path.stat().st_size, span=days),)),
                         spec, Storage()) for d in days}
    assert {d.isoformat(): g.rows_read for d, g in got.items()} == {"2024-01-01": {"2024-01-01": 1200},
                                                                   "2024-01-02": {"2024-01-02": 600}}
    first, second = (got[d].quarantined for d in days)
    assert first["rows"].to_list() == [600] and second["rows"].to_list() == [1]
    assert "(its rows counted under" not in first["reason"][0]
    assert second["reason"][0].startswith(f"damaged Parquet pages in '{path}' row group 1, column 'temp' (its rows "
                                          "counted under 2024-01-01): ")
    assert unusable_reasons(second) == {f"proc: {DAMAGED_ELSEWHERE}": 1}
    said, named = left_out_input(unusable_reasons(second))
    assert said.startswith("1 row group(s) of files spanning several dates") and named == "'damaged Parquet pages ...'"
    assert sum(g.usable_rows[d.isoformat()]["proc"] for d, g in got.items()) == 1200   # groups 0 and 2
    with open_parquet(Storage().filesystem(str(path)), str(path)) as parquet:
        assert [damaged_owner_date(parquet, "ts", r, days, "UTC") for r in range(3)] == [days[0], days[0], days[1]]
        assert damaged_owner_date(parquet, "ts", 2, days, "Asia/Tokyo") == days[1]       # 02:40 UTC: 11:40 there
        assert damaged_owner_date(parquet, "ts", 2, days, "America/New_York") == days[0]  # 21:40 on 01-01 there
        assert damaged_owner_date(parquet, "machine_id", 1, days, "UTC") == days[0]   # no time statistics: the first


def test_a_read_that_fails_on_the_way_is_read_again_and_only_damaged_bytes_are_a_damaged_row_group(tmp_path):
    """A row group read that fails is tried once more from its bytes fetched anew into memory: the rows when they
    decode (the first read failed on the way - here a handle on other bytes), a `DamagedRowGroup` when they do not,
    and a plain DataError when the bytes cannot be fetched (nothing proven)."""
    import shutil

    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from pipelines.parquet_files import DamagedRowGroup, read_columns

    damaged = tmp_path / "damaged.parquet"
    table = _damaged_file(damaged)
    good = tmp_path / "good.parquet"
    pq.write_table(table, good, write_page_checksum=True, compression="none", row_group_size=600,
                   data_page_size=1_000, use_dictionary=False, write_batch_size=100)
    local = pafs.LocalFileSystem()
    on_damaged = pq.ParquetFile(pa.BufferReader(damaged.read_bytes()), page_checksum_verification=True)
    assert read_columns(on_damaged, str(good), ["temp"], [1], local).equals(table.select(["temp"]).slice(600, 600))
    with pytest.raises(DamagedRowGroup, match=r"row group 1: .*checksum"):
        read_columns(on_damaged, str(damaged), ["temp"], [1], local)
    shutil.move(damaged, tmp_path / "moved.parquet")
    with pytest.raises(DataError, match=r"damaged\.parquet: not a readable Parquet file \(row group 1: ") as gone:
        read_columns(on_damaged, str(damaged), ["temp"], [1], local)
    assert not isinstance(gone.value, DamagedRowGroup)
    with pytest.raises(DataError) as plain:
        read_columns(on_damaged, str(good), ["temp"], [1])          # no filesystem: not tried again
    assert not isinstance(plain.value, DamagedRowGroup)


def test_row_intervals_are_each_entitys_median_between_rows_per_date_and_a_change_is_found_against_training(
        tiny_spec):
    """`daily_intervals`: per date and entity the median interval between consecutive rows (a look-back row gives the
    date's first row its interval; rows at one time not counted; fewer than 10 intervals: none); training counts the
    days per interval bin; scoring names an entity whose interval lies over 20 bins (about 1.5 x) outside every
    training day's, not one within, nor one the version never trained on."""
    import datetime as dt

    from pipelines.ingest import count_row_intervals, daily_intervals, interval_bin, merge_counts
    from pipelines.score import DateResult, about, changed_intervals_lines, changed_row_intervals

    day = 1_704_153_600_000_000                                        # 2024-01-02 00:00 UTC
    minute = 60_000_000
    times = [day - minute, *(day + i * minute for i in range(11)), day + 10 * minute,   # a repeated time
             *(day + 5 * i * 1_000_000 for i in range(5))]
    table = pl.DataFrame({"machine_id": ["a"] * 13 + ["b"] * 5, "_t": times})
    spec = _proc_spec(tiny_spec, "/tmp/none")
    two, three = dt.date(2024, 1, 2), dt.date(2024, 1, 3)
    assert daily_intervals(table, spec, [two, three]) == {"2024-01-02": {"a": minute}}   # b: 4 intervals only
    assert daily_intervals(table, spec, [three]) == {}
    assert interval_bin(minute) == round(32 * np.log2(minute)) and interval_bin(0) == 0
    counts = count_row_intervals({}, {"2024-01-01": {"proc": {"a": minute}}, "2024-01-02": {"proc": {"a": minute}}})
    assert counts == {"proc": {"a": {str(interval_bin(minute)): 2}}}
    assert merge_counts(counts, {"proc": {"a": {"1": 1}, "b": {"2": 3}}}) == {
        "proc": {"a": {str(interval_bin(minute)): 2, "1": 1}, "b": {"2": 3}}}
    manifest = {"input_row_intervals": {"proc": {"a": {str(interval_bin(minute)): 5}}}}
    assert changed_row_intervals({"proc": {"a": int(minute * 1.3), "new": 4 * minute}}, manifest) == {}
    changed = changed_row_intervals({"proc": {"a": 5 * minute}}, manifest)
    (entity, now, then), = changed["proc"]["first"]
    assert (entity, now, changed["proc"]["changed"], changed["proc"]["compared"]) == ("a", 5 * minute, 1, 1)
    assert abs(then - minute) < 0.05 * minute and changed_row_intervals({"proc": {"a": 1}}, {}) is None
    assert (about(4_000_000), about(250_000), about(90_000_000), about(17)) == ("4 s", "250 ms", "1.5 min", "17 us")
    (line,) = changed_intervals_lines(DateResult("2024-01-02", 1, 1, 0, 0, 0.0, changed_intervals=changed), "v1",
                                      {"proc": "tabular"})
    assert line.startswith("2024-01-02: modality 'proc': 1 of its 1 entities' rows came at another interval than on "
                           "any of model version v1's training days (the median between consecutive rows): a every "
                           "5 min against 1 min - a source reconfigured, or rows thinned or batched on their way?")


def test_smoothed_relation_residuals_keep_unit_variance_add_up_an_offset_and_carry_between_batches():
    """`smooth_residuals`: independent unit residuals stay unit from each group's first tick on; a persistent
    offset of half a residual std grows towards sqrt((2 - alpha) / alpha) of itself; NaN is skipped; a group's
    series cut into batches smooths as one when the carry is handed on."""
    from dmafn.features import smooth_residuals

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(4000).astype(str), 6)
    noise = rng.normal(size=(len(groups), 1))
    out = smooth_residuals(noise, groups, 0.5).reshape(4000, 6)
    assert np.std(out[:, 0]) == pytest.approx(1.0, abs=0.05) and np.std(out[:, 5]) == pytest.approx(1.0, abs=0.05)
    offset = smooth_residuals(np.full((40, 1), 0.5), np.zeros(40, str), 0.5)[:, 0]
    assert offset[0] == pytest.approx(0.5) and offset[-1] == pytest.approx(0.5 * np.sqrt(3.0))
    z = rng.normal(size=(10, 2))
    z[3, 1] = np.nan
    keys = np.array(["a"] * 5 + ["b"] * 5)
    whole = smooth_residuals(z, keys, 0.3)
    assert np.isnan(whole[3, 1]) and np.isfinite(whole[4, 1])
    carry: dict = {}
    parts = np.r_[smooth_residuals(z[:3], keys[:3], 0.3, carry), smooth_residuals(z[3:], keys[3:], 0.3, carry)]
    np.testing.assert_allclose(parts, whole, rtol=1e-12)
    by_hand, total, weights = [], 0.0, 0.0
    for value in z[5:, 0]:
        total, weights = 0.3 * value + 0.7 * total, 0.09 + 0.49 * weights
        by_hand.append(total / np.sqrt(weights))
    np.testing.assert_allclose(whole[5:, 0], by_hand, rtol=1e-12)


def test_relation_smoothing_raises_a_small_persistent_drift_and_scores_alike_in_any_batches():
    """With `model.relation_smoothing` the fitted relation keeps its weight and `featurize` averages each channel's
    signed residual per entity and date in time order before squaring it: a drift of one residual std scores far
    more than tick by tick, normal ticks about 1 as before; rows shuffled or cut into batches with a carry give the
    same errors; statistics without the key (versions before) score each tick on its own."""
    from dmafn.spec import TICK_TIME, SpecError, parse_spec, spec_to_dict

    data = spec_to_dict(_relation_spec())
    spec = parse_spec({**data, "model": {**data["model"], "relation_smoothing": 1}})          # none
    smoothed_spec = parse_spec({**data, "model": {**data["model"], "relation_smoothing": 0.3}})
    assert _relation_spec().model.relation_smoothing == 0.7                                  # the default
    with pytest.raises(SpecError, match="model.relation_smoothing': 0 is outside"):
        parse_spec({**data, "model": {"relation_smoothing": 0}})
    rng = np.random.default_rng(0)
    offsets = {"a": 0.0, "b": 5.0}
    train = _relation_rows(spec, 600, rng, offsets)
    plain = StatisticsFitter(spec).add(train).result()
    stats = StatisticsFitter(smoothed_spec).add(train).result()
    assert "smoothing" not in plain["relations"]["proc_context"]
    assert stats["relations"]["proc_context"]["smoothing"] == 0.3

    def timed(table):
        n = table.num_rows
        minutes = np.arange(n) // 2                                          # a tick a minute per entity
        return table.append_column(TICK_TIME, pa.array(minutes * 60_000_000, pa.int64())) \
            .append_column("date", pa.array(["2024-01-01"] * n))

    proc = 0
    normal = timed(_relation_rows(spec, 400, rng, offsets))
    drift = timed(_relation_rows(spec, 400, rng, offsets, drift=0.05))       # one residual std (0.05)
    for name, table in (("normal", normal), ("drift", drift)):
        tick = featurize(table, smoothed_spec, plain).relation_errors[:, proc]
        smooth = featurize(table, smoothed_spec, stats).relation_errors[:, proc]
        if name == "normal":
            assert tick.mean() < 3 and smooth.mean() < 3
        else:
            assert smooth[40:].mean() > 2 * tick[40:].mean()
    whole = featurize(drift, smoothed_spec, stats).relation_errors
    shuffled = rng.permutation(drift.num_rows)
    np.testing.assert_allclose(featurize(drift.take(shuffled), smoothed_spec, stats).relation_errors,
                               whole[shuffled], rtol=1e-5)
    carry: dict = {}
    batches = [featurize(drift.slice(lo, 150), smoothed_spec, stats, carry=carry).relation_errors
               for lo in range(0, drift.num_rows, 150)]
    np.testing.assert_allclose(np.concatenate(batches), whole, rtol=1e-5)
    assert featurize(drift.slice(150), smoothed_spec, stats).relation_errors[0, proc] != \
        pytest.approx(float(whole[150, proc]))                          # without the carry: started afresh


def test_a_dead_channel_leaves_its_modality_present_with_the_others_and_out_of_the_fits():
    """A tick whose `proc` has temp but no pressure (a dead channel: `align` keeps the modality present) gets the
    pressure at its training mean (0) and False in `channels`, temp as it is; the relation and the state read the
    modality as absent there (every channel needed); the statistics are fitted on the complete ticks only, so ticks
    with a dead channel change no fitted number."""
    spec = _relation_spec()
    rng = np.random.default_rng(5)
    offsets = {"a": 0.0, "b": 5.0}
    train = _relation_rows(spec, 400, rng, offsets)
    dead = np.arange(400) % 3 == 0
    holed = train.set_column(train.schema.get_field_index("proc__pres"), "proc__pres",
                             pa.array(np.where(dead, np.nan, train["proc__pres"].to_numpy()), from_pandas=True))
    silent = train.set_column(train.schema.get_field_index("proc__pres"), "proc__pres", pa.nulls(400, pa.float64()))
    from dmafn.features import NoUsableRows
    with pytest.raises(NoUsableRows, match=r"column 'pres' holds no value at any of the 400 ticks") as caught:
        StatisticsFitter(spec).add(silent.slice(0, 150)).merge(StatisticsFitter(spec).add(silent.slice(150))).result()
    assert (caught.value.modality, caught.value.dead, caught.value.present) == ("proc", ("pres",), 400)
    absent = train.set_column(train.schema.get_field_index("proc__present"), "proc__present", pa.array(~dead))
    stats = StatisticsFitter(spec).add(holed).result()
    same_statistics(stats, StatisticsFitter(spec).add(absent).result())       # as if the modality were absent

    rows = _relation_rows(spec, 90, rng, offsets)
    gone = np.arange(90) % 2 == 0
    partial = rows.set_column(rows.schema.get_field_index("proc__pres"), "proc__pres",
                              pa.array(np.where(gone, None, rows["proc__pres"].to_numpy()).tolist(), pa.float64()))
    full, part = featurize(rows, spec, stats), featurize(partial, spec, stats)
    proc = part.modalities.index("proc")
    assert part.mask[:, proc].all()
    np.testing.assert_array_equal(part.channels["proc"], np.stack([np.ones(90, bool), ~gone], 1))
    assert (part.inputs["proc"][gone, 1] == 0).all()
    np.testing.assert_array_equal(part.inputs["proc"][:, 0], full.inputs["proc"][:, 0])
    np.testing.assert_array_equal(part.inputs["proc"][~gone], full.inputs["proc"][~gone])
    assert (part.relation_errors[gone, proc] == 0).all() and (full.relation_errors[gone, proc] > 0).all()
    np.testing.assert_array_equal(part.relation_errors[~gone], full.relation_errors[~gone])
    assert part.rows(np.arange(4)).channels["proc"].shape == (4, 2)
    from dmafn.features import features_from_columns, features_to_columns
    again = features_from_columns(features_to_columns(part), part.modalities)
    np.testing.assert_array_equal(again.channels["proc"], part.channels["proc"])


def _wide_rows(spec, n, rng, shift=0.0, dead=None, peer=False):
    """Aligned rows of a 4-channel `proc` (a, b, c, d) and its 10-minute context with no peer modality: each channel a
    mix of two slowly moving loads plus noise, entities "a" and "b" each with their own offsets; `shift` moves
    channel a now (its history stays); `dead`: a channel null now and over its context window (a dead tag); `peer`:
    with `vib`, a 3-step window of the first load now plus fast noise."""
    steps = spec.modalities["proc_context"].steps
    loads = np.cumsum(rng.normal(0, 0.3, (n, steps, 2)), 1) + rng.normal(0, 1, (n, 1, 2))
    mix = np.array([[1.0, 0.5, -0.7, 0.2], [0.3, -1.0, 0.6, 0.9]])
    keys = np.array(["a", "b"] * (n // 2))
    offsets = np.where(keys == "a", 0.0, 4.0)[:, None, None] * np.array([1.0, -1.0, 0.5, 2.0])
    values = loads @ mix + offsets + rng.normal(0, 0.05, (n, steps, 4))                    # (n, steps, 4)
    current = values[:, -1, :].astype(np.float64)
    current[:, 0] += shift
    table = {"machine_id": keys.tolist(), "proc__present": [True] * n, "proc_context__present": [True] * n}
    for j, column in enumerate("abcd"):
        gone = column == dead
        table[f"proc__{column}"] = pa.array([None] * n if gone else current[:, j], pa.float64())
        table[f"proc_context__{column}"] = pa.array([None] * n if gone else values[:, :, j].astype(np.float32).tolist(),
                                                    pa.list_(pa.float32()))
    if peer:
        vib = loads[:, -1:, 0] + rng.normal(0, 0.05, (n, 3))
        table.update({"vib__present": [True] * n, "vib__a": pa.array(vib.astype(np.float32).tolist(),
                                                                      pa.list_(pa.float32()))})
    return pa.table(table)


def test_a_dead_tag_leaves_the_other_channels_related_to_whatever_else_is_there(monkeypatch):
    """A parent of three channels or more keeps the within-entity covariance of its relation's quantities
    (`conditional`): while one channel is dead (null now and over its context window) and no peer can stand in, each
    other channel is read against the quantities still there (`conditional_residuals`, a Gaussian conditioned on
    them) - a channel that left its relation errs far more than one that kept it (before, no relation error at all
    while any channel was missing); with every quantity there the conditional residuals are the fitted relations';
    complete ticks are scored as before; the entity means travel with the entity parts; a dead channel's context
    window is not read even where it still holds values (carried forward: stale); a context window missing
    altogether leaves the current values to read."""
    from dmafn.features import (clip_quantities, conditional_residuals, group_rows, join_entity_statistics,
                                relation_lines, relation_quantities, relation_residuals, split_entity_statistics)
    from dmafn.spec import parse_spec
    from tests.conftest import tiny_spec_dict

    data = tiny_spec_dict()
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "columns": list("abcd"),
                                   "context": {"window": "10min"}}}
    spec = parse_spec(data)
    rng = np.random.default_rng(8)
    stats = StatisticsFitter(spec).add(_wide_rows(spec, 1200, rng)).result()
    relation = stats["relations"]["proc_context"]
    conditional = relation["conditional"]
    assert np.asarray(conditional["covariance"]).shape == (16, 16) and set(conditional["entity_means"]) == {"a", "b"}
    assert relation_lines(stats, spec)[-1] == ("modality 'proc': while a channel is dead or its context window "
                                               "missing, each other channel is read against the quantities still "
                                               "there (the covariance of its 16 quantities kept)")
    fleet, entities = split_entity_statistics(stats)
    assert fleet["relations"]["proc_context"]["conditional"]["entity_means"] == {}
    same_statistics(join_entity_statistics(fleet, entities.items()), stats)
    same_statistics(_fit_in_buckets(StatisticsFitter(spec).add(_wide_rows(spec, 400, np.random.default_rng(9))), 3)[2],
                    StatisticsFitter(spec).add(_wide_rows(spec, 400, np.random.default_rng(9))).result(),
                    rtol=1e-6)                 # the buckets add in another order: covariances of near-equal sums

    rows = _wide_rows(spec, 300, rng)                  # every quantity there: the fitted relations' residuals
    current = np.column_stack([rows[f"proc__{c}"].to_numpy() for c in "abcd"])
    history = np.stack([np.array(rows[f"proc_context__{c}"].to_pylist()) for c in "abcd"], 2)
    keys = rows["machine_id"].to_pylist()
    quantities = clip_quantities(relation_quantities(current, history), relation["ranges"], group_rows(keys))
    np.testing.assert_allclose(conditional_residuals(conditional, current, quantities, np.ones((300, 16), bool), keys),
                               relation_residuals(relation, current, history, keys), rtol=1e-3, atol=1e-3)

    proc = list(spec.modalities).index("proc")
    calm = featurize(_wide_rows(spec, 300, rng, dead="d"), spec, stats)
    moved = featurize(_wide_rows(spec, 300, rng, shift=1.0, dead="d"), spec, stats)
    assert calm.mask[:, proc].all() and not calm.channels["proc"][:, 3].any()
    assert 0.3 < calm.relation_errors[:, proc].mean() < 3
    assert moved.relation_errors[:, proc].mean() > 10 * calm.relation_errors[:, proc].mean()
    assert (moved.relation_channels["proc"][:, 3] == 0).all()                    # the dead channel: no residual
    assert moved.relation_channels["proc"][:, 0].mean() > 10 * calm.relation_channels["proc"][:, 0].mean()
    gone, alive = (_wide_rows(spec, 80, np.random.default_rng(12), shift=1.0, dead=dead) for dead in ("d", None))
    stale = gone.set_column(gone.schema.get_field_index("proc_context__d"), "proc_context__d",
                            alive["proc_context__d"])      # dead now, its window carrying its last values forward
    np.testing.assert_array_equal(featurize(stale, spec, stats).relation_errors,
                                  featurize(gone, spec, stats).relation_errors)
    without = {**stats, "relations": {"proc_context": {k: v for k, v in relation.items()
                                                       if k != "conditional"}}}   # a version before 2026-12-06
    assert (featurize(_wide_rows(spec, 50, rng, shift=1.0, dead="d"), spec, without).relation_errors == 0).all()
    whole = _wide_rows(spec, 60, rng, shift=1.0)
    np.testing.assert_array_equal(featurize(whole, spec, stats).relation_errors,
                                  featurize(whole, spec, without).relation_errors)
    unseen = _wide_rows(spec, 60, rng, dead="b")
    unseen = unseen.set_column(0, "machine_id", pa.array(["z"] * 60))          # an entity not trained on
    assert (featurize(unseen, spec, stats).relation_channels["proc"][:, [0, 2, 3]] > 0).all()
    import dmafn.features
    monkeypatch.setattr(dmafn.features, "CONDITIONAL_QUANTITIES", 8)        # a wider table than the limit: none kept
    capped = StatisticsFitter(spec).add(_wide_rows(spec, 1200, rng)).result()
    assert "conditional" not in capped["relations"]["proc_context"]
    assert relation_lines(capped, spec)[-1] == ("modality 'proc': 16 relation quantities, over the 8 whose covariance "
                                                "is kept: while one of its channels is dead the others are related to "
                                                "nothing (no relation error)")
    blind = whole.set_column(whole.schema.get_field_index("proc_context__present"), "proc_context__present",
                             pa.array([False] * 60))
    now_only = featurize(blind, spec, stats).relation_errors[:, proc]
    assert (now_only > 0).all() and (featurize(blind, spec, without).relation_errors[:, proc] == 0).all()


def test_a_dead_tag_with_peers_leaves_the_other_channels_related_to_the_rest_and_the_peers():
    """With a peer, a parent of three channels or more also keeps the covariance of the cross-modal relation's
    quantities (`cross_conditional`): while a tag is dead each other channel is read against its siblings still there
    and the peers' values, not the peers alone (`peer_channels`, which a two-channel parent keeps) - a channel that
    left its relation stands out far more; with every quantity there it is the cross-modal fit; where the peer is
    absent too the within-modality covariance stands in; the entity means travel with the entity parts."""
    from dmafn.features import (clip_quantities, conditional_residuals, group_rows, join_entity_statistics,
                                peer_values, relation_lines, relation_quantities, relation_residuals,
                                split_entity_statistics)
    from dmafn.spec import parse_spec
    from tests.conftest import tiny_spec_dict

    data = tiny_spec_dict()
    data["modalities"] = {"proc": {**data["modalities"]["proc"], "columns": list("abcd"),
                                   "context": {"window": "10min"}}, "vib": data["modalities"]["vib"]}
    spec = parse_spec(data)
    rng = np.random.default_rng(10)
    stats = StatisticsFitter(spec).add(_wide_rows(spec, 1200, rng, peer=True)).result()
    relation = stats["relations"]["proc_context"]
    across = relation["cross_conditional"]
    assert np.asarray(across["covariance"]).shape == (18, 18) and set(across["entity_means"]) == {"a", "b"}
    assert relation_lines(stats, spec)[-1].startswith("modality 'proc': while a channel is dead or its context "
                                                      "window missing, each other channel is read against the "
                                                      "quantities still there and the peers' values where they are")
    fleet, entities = split_entity_statistics(stats)
    assert fleet["relations"]["proc_context"]["cross_conditional"]["entity_means"] == {}
    same_statistics(join_entity_statistics(fleet, entities.items()), stats)

    rows = _wide_rows(spec, 300, rng, peer=True)
    current = np.column_stack([rows[f"proc__{c}"].to_numpy() for c in "abcd"])
    history = np.stack([np.array(rows[f"proc_context__{c}"].to_pylist()) for c in "abcd"], 2)
    vib = np.array(rows["vib__a"].to_pylist(), np.float32)[:, :, None]
    peers, _ = peer_values({"vib": vib}, {"vib": np.ones(300, bool)}, spec, ["vib"], spread=True)
    keys = rows["machine_id"].to_pylist()
    quantities = clip_quantities(relation_quantities(current, history, peers), relation["cross_ranges"],
                                 group_rows(keys))
    np.testing.assert_allclose(conditional_residuals(across, current, quantities, np.ones((300, 18), bool), keys, 2),
                               relation_residuals(relation, current, history, keys, peers), rtol=1e-3, atol=1e-3)

    proc = list(spec.modalities).index("proc")
    alone = {**stats, "relations": {"proc_context": {k: v for k, v in relation.items()       # the peers alone (a
                                                     if k not in ("cross_conditional", "conditional")}}}   # version
    within = {**stats, "relations": {"proc_context": {k: v for k, v in relation.items()       # before 2026-12-06);
                                                      if k != "cross_conditional"}}}   # too many quantities with peers
    def channel_a(stats, **kw):
        return featurize(_wide_rows(spec, 300, rng, dead="d", peer=True, **kw), spec, stats).relation_channels["proc"]

    calm, moved = channel_a(stats), channel_a(stats, shift=1.0)
    assert (moved[:, 3] == 0).all() and 0.05 < calm[:, 0].mean() < 1
    peers_only = channel_a(alone, shift=1.0)[:, 0].mean() / channel_a(alone)[:, 0].mean()
    assert moved[:, 0].mean() / calm[:, 0].mean() > 5 * peers_only
    siblings = channel_a(within, shift=1.0)[:, 0].mean() / channel_a(within)[:, 0].mean()   # siblings, not peers
    assert siblings > 3 * peers_only                    # here 57x the calm error against 13x; with the peers 350x
    assert relation_lines(within, spec)[-1].endswith("quantities kept; with the peers' values they are over 256: "
                                                     "the peers are not read then)")
    blind = _wide_rows(spec, 60, rng, shift=1.0, dead="d", peer=True)
    blind = blind.set_column(blind.schema.get_field_index("vib__present"), "vib__present", pa.array([False] * 60))
    assert featurize(blind, spec, stats).relation_channels["proc"][:, 0].mean() > 10   # the within covariance's


def test_a_dead_channels_modality_keeps_a_relation_with_its_peers_alone():
    """Each channel of a parent with peers also gets a relation on the peers' values alone (`peer_channels`, from the
    cross-modal fit's accumulated cross products): while pressure is dead (null, and with it its context window) a
    temperature where the vibration's load puts it errs ~1 and one that left it errs far more, scored by that
    relation (before, no relation error at all while a channel was missing); the dead channel itself gets none;
    ticks with every channel are scored as before; the per-entity intercepts travel with the entity parts."""
    from dmafn.features import join_entity_statistics, split_entity_statistics
    spec, stats, rng = _cross_fitted(6)
    alone = stats["relations"]["proc_context"]["peer_channels"]
    assert [len(f["weights"]) for f in alone] == [2, 2] and set(alone[0]["entity_intercepts"]) == {"a"}
    fleet, entities = split_entity_statistics(stats)
    assert fleet["relations"]["proc_context"]["peer_channels"][0]["entity_intercepts"] == {}
    same_statistics(join_entity_statistics(fleet, entities.items()), stats)
    proc = list(spec.modalities).index("proc")

    def dead(rows):                                     # pressure null now and over the context window
        for name, kind in (("proc__pres", pa.float64()), ("proc_context__pres", pa.list_(pa.float32()))):
            rows = rows.set_column(rows.schema.get_field_index(name), name, pa.nulls(rows.num_rows, kind))
        return rows

    normal = dead(_cross_rows(spec, 200, rng, spread=0.4))
    shifted = dead(_cross_rows(spec, 200, rng, spread=0.4, shift=1.2))
    calm, moved = featurize(normal, spec, stats), featurize(shifted, spec, stats)
    assert calm.mask[:, proc].all() and not calm.channels["proc"][:, 1].any()
    assert 0 < calm.relation_errors[:, proc].mean() < 3
    assert moved.relation_errors[:, proc].mean() > 20 * calm.relation_errors[:, proc].mean()
    assert (moved.relation_channels["proc"][:, 1] == 0).all()                      # the dead channel: no residual
    without = {**stats, "relations": {"proc_context": {k: v for k, v in stats["relations"]["proc_context"].items()
                                                       if k != "peer_channels"}}}   # a version before 2026-12-06
    assert (featurize(shifted, spec, without).relation_errors[:, proc] == 0).all()
    whole = _cross_rows(spec, 50, rng, spread=0.4, shift=1.2)
    np.testing.assert_array_equal(featurize(whole, spec, stats).relation_errors,
                                  featurize(whole, spec, without).relation_errors)
