"""Encoders, fusion layers, heads and the composed model: shapes, masks, gradients, and that every
fusion x detector pair learns to rank injected anomalies above normal ticks."""
import numpy as np
import pytest
import torch

from dmafn.detector import Detector
from dmafn.encoders import AudioEncoder, ImageEncoder, SeriesEncoder, TabularEncoder, TextEncoder
from dmafn.fusion import AttentionFusion, EarlyFusion, GatedFusion
from dmafn.metrics import roc_auc
from dmafn.model import ModelConfig, build_model, channel_dropout, modality_dropout, small, training_loss
from dmafn.spec import DETECTORS, FUSIONS, SERIES_ENCODERS
from tests.modeldata import make, specs

B, D = 5, 16


@pytest.mark.parametrize("cell", SERIES_ENCODERS)
def test_series_encoders_shape_and_gradient(cell):
    torch.manual_seed(0)
    enc = SeriesEncoder(3, 12, D, cell)
    x = torch.randn(B, 12, 3, requires_grad=True)
    out = enc(x)
    assert out.shape == (B, D)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert enc.target(x).shape == (B, enc.target_dim)


def test_tcn_is_causal():
    torch.manual_seed(0)
    enc = SeriesEncoder(1, 10, D, "tcn")
    x = torch.randn(1, 10, 1)
    a = enc(x)
    x2 = x.clone()
    x2[0, 6:] += 5.0       # the steps from 6 on change the state at the tick ...
    assert not torch.allclose(a, enc(x2))
    # ... and leave every state before step 6 exactly as it was
    before, after = enc.tcn.states(x), enc.tcn.states(x2)
    assert torch.equal(before[..., :6], after[..., :6])
    assert not torch.allclose(before[..., 6:], after[..., 6:])


@pytest.mark.parametrize("make_enc,x", [
    (lambda: TabularEncoder(4, D), torch.randn(B, 4)),
    (lambda: ImageEncoder(1, D), torch.rand(B, 1, 24, 24)),
    (lambda: ImageEncoder(3, D), torch.rand(B, 3, 16, 16)),
    (lambda: ImageEncoder(1, D, grid=True), torch.rand(B, 1, 32, 32)),
    (lambda: ImageEncoder(3, D, grid=True), torch.rand(B, 3, 8, 8)),         # maps smaller than the grid
    (lambda: ImageEncoder(1, D, grid=True), torch.rand(B, 1, 100, 60)),
    (lambda: TextEncoder(D, "transformer", 10), torch.randint(0, 50, (B, 10))),
    (lambda: TextEncoder(D, "bag", 10), torch.randint(0, 50, (B, 10))),
    (lambda: AudioEncoder(8000, D), torch.randn(B, 4000)),
])
def test_encoders_shapes(make_enc, x):
    torch.manual_seed(0)
    enc = make_enc()
    assert enc(x).shape == (B, D)
    assert enc.target(x).shape == (B, enc.target_dim)


def test_text_encoder_handles_empty_windows():
    enc = TextEncoder(D, "transformer", 6)
    out = enc(torch.zeros(2, 6, dtype=torch.long))
    assert torch.isfinite(out).all()


def test_text_encoder_encodes_repeated_windows_once_with_the_same_result_and_gradients():
    torch.manual_seed(0)
    enc = TextEncoder(D, "transformer", 6)
    windows = torch.randint(1, 50, (3, 6))
    tokens = windows[[0, 1, 0, 2, 2, 0]]                              # repeated windows, as ticks have them
    each = torch.cat([enc(row[None]) for row in tokens])              # one at a time: no de-duplication
    together = enc(tokens)
    assert torch.allclose(together, each, atol=1e-6)
    together.sum().backward()
    assert enc.embed.weight.grad is not None and enc.embed.weight.grad.abs().sum() > 0


def _full_width_text(enc, tokens):
    """The text transformer over every column of the window (the reference the trimmed chunks must equal)."""
    h = torch.cat([enc.cls.expand(len(tokens), -1, -1), enc.embed(tokens)], 1) + enc.pos[:, : tokens.shape[1] + 1]
    pad = torch.cat([torch.zeros_like(tokens[:, :1], dtype=torch.bool), tokens == 0], 1)
    return enc.out(enc.transformer(h, src_key_padding_mask=pad)[:, 0])


def test_text_encoder_in_length_sorted_trimmed_chunks_equals_the_full_window_with_gradients():
    from dmafn.encoders import TEXT_CHUNK

    torch.manual_seed(0)
    enc = TextEncoder(D, "transformer", 12)
    n = 2 * TEXT_CHUNK + 7                                        # several chunks
    tokens = torch.randint(1, 50, (n, 12))
    lengths = torch.randint(0, 13, (n,))
    tokens[torch.arange(12).expand(n, 12) < (12 - lengths)[:, None]] = 0      # left padding, as windows have
    tokens[5, 9] = 0                                              # and a padding id inside one window
    got, expected = enc._encode(tokens), _full_width_text(enc, tokens)
    assert torch.allclose(got, expected, atol=1e-5)
    got.sum().backward()
    trimmed = [p.grad.clone() for p in enc.parameters()]
    enc.zero_grad()
    expected.sum().backward()
    for a, b in zip(trimmed, [p.grad for p in enc.parameters()]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encode_equals_torch_transformer_encoder_and_its_first_positions_with_gradients(norm_first):
    from dmafn.layers import encode

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(D, 4, 2 * D, dropout=0.0, batch_first=True, norm_first=norm_first)
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    h = torch.randn(B, 7, D, requires_grad=True)
    pad = torch.rand(B, 7) < 0.4
    pad[:, 0] = False                                             # a [CLS] position is never padding
    expected = encoder(h, src_key_padding_mask=pad)
    assert torch.allclose(encode(encoder, h, pad), expected, atol=1e-5)
    first = encode(encoder, h, pad, outputs=1)                    # (B, 1, D): the last layer for position 0 only
    assert first.shape == (B, 1, D) and torch.allclose(first[:, 0], expected[:, 0], atol=1e-5)
    grad_first, = torch.autograd.grad(first.sum(), h)
    grad_expected, = torch.autograd.grad(expected[:, 0].sum(), h)
    assert torch.allclose(grad_first, grad_expected, atol=1e-5)


def test_distinct_rows_rebuild_the_input_and_are_distinct():
    from dmafn.encoders import distinct_rows

    rows = torch.tensor([[1, 2], [1, 2], [3, 4], [1, 2], [3, 4], [3, 4], [0, 0]])
    distinct, index = distinct_rows(rows)
    assert torch.equal(distinct[index], rows)
    assert len(distinct) == 3 and len(torch.unique(distinct, dim=0)) == 3
    frames = torch.rand(2, 1, 4, 4)[[0, 1, 1, 0]]
    distinct, index = distinct_rows(frames)
    assert distinct.shape == (2, 1, 4, 4) and torch.equal(distinct[index], frames)


def test_attention_fusion_leave_one_out_equals_hiding_each_modality_by_its_mask():
    torch.manual_seed(0)
    fusion = AttentionFusion(3, D).eval()
    tokens = torch.randn(B, 3, D)
    mask = torch.tensor([[True, True, True], [True, False, True], [False, True, True],
                         [True, True, False], [True, False, False]])
    with torch.no_grad():
        together = fusion.leave_one_out(tokens, mask).view(3, B, D)
        for i in range(3):
            hidden = mask.clone()
            hidden[:, i] = False
            defined = hidden.any(1)                                # rows where another modality is present
            assert torch.allclose(together[i][defined], fusion(tokens, hidden)[defined], atol=1e-5), i


def test_image_encoder_scores_each_distinct_frame_once_with_the_same_result():
    from dmafn.encoders import ImageEncoder

    torch.manual_seed(0)
    enc = ImageEncoder(1, D).eval()
    frames = torch.rand(3, 1, 16, 16)[[0, 0, 1, 2, 2, 2, 0]]
    with torch.no_grad():
        deduplicated = enc(frames)
    assert torch.allclose(deduplicated, enc(frames), atol=1e-6)     # with gradients on: every row encoded


def test_image_encoder_grid_keeps_where_things_are_in_the_frame():
    """A blob moved by 8 pixels (the CNN's stride) away from the borders: the whole-frame average gives the same
    embedding for both frames, the grid tells them apart."""
    from dmafn.encoders import ImageEncoder

    here, there = torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 64, 64)
    here[..., 24:28, 24:28] = 1
    there[..., 32:36, 32:36] = 1
    with torch.no_grad():
        for grid, same in ((False, True), (True, False)):
            torch.manual_seed(0)
            enc = ImageEncoder(1, D, grid=grid).eval()
            a, b = enc(here), enc(there)
            assert torch.allclose(a, b, atol=1e-6) == same, grid
            assert not torch.allclose(a, enc(torch.zeros(1, 1, 64, 64)), atol=1e-4)   # both see the blob


def test_model_versions_before_the_image_grid_rebuild_the_whole_frame_average():
    from dataclasses import asdict

    from dmafn.model import model_config
    from dmafn.spec import ModalitySpec, ModelSpec

    mods = {"camera": ModalitySpec(name="camera", kind="image", path="x", column="frame", size=(16, 16))}
    old = {k: v for k, v in asdict(model_config(ModelSpec())).items() if k != "image_grid"}   # an older manifest
    assert build_model(mods, ModelConfig(**old)).encoders["camera"].net[-1].in_features == 64
    assert build_model(mods, model_config(ModelSpec())).encoders["camera"].net[-1].in_features == 64 * 16


def test_audio_log_mel_sees_pitch():
    enc = AudioEncoder(8000, D)
    t = torch.arange(4000) / 8000
    low, high = torch.sin(2 * torch.pi * 200 * t), torch.sin(2 * torch.pi * 2000 * t)
    mel = enc.log_mel(torch.stack([low, high]))
    assert mel.mean(2)[0].argmax() < mel.mean(2)[1].argmax()


@pytest.mark.parametrize("fusion", [AttentionFusion(3, D), GatedFusion(3, D)])
def test_fusion_ignores_absent_modalities(fusion):
    torch.manual_seed(0)
    tokens = torch.randn(B, 3, D)
    mask = torch.tensor([[True, True, False]] * B)
    changed = tokens.clone()
    changed[:, 2] += 100.0          # the absent modality's token changes nothing
    fusion.eval()
    assert torch.allclose(fusion(tokens, mask), fusion(changed, mask), atol=1e-5)
    changed[:, 0] += 1.0            # a present one does
    assert not torch.allclose(fusion(tokens, mask), fusion(changed, mask), atol=1e-5)


def test_fusion_with_no_modality_is_finite():
    mask = torch.zeros(B, 3, dtype=torch.bool)
    for fusion in (AttentionFusion(3, D), GatedFusion(3, D)):
        assert torch.isfinite(fusion(torch.randn(B, 3, D), mask)).all()


def test_early_fusion_ignores_absent_inputs():
    fusion = EarlyFusion([2, 3], D)
    a, b = torch.randn(B, 2), torch.randn(B, 3)
    mask = torch.tensor([[True, False]] * B)
    assert torch.allclose(fusion([a, b], mask), fusion([a, b + 50], mask))


def test_modality_dropout_keeps_one_present():
    torch.manual_seed(0)
    mask = torch.ones(1000, 4, dtype=torch.bool)
    mask[:, 3] = False
    dropped = modality_dropout(mask, 0.9)
    assert dropped.any(1).all()
    assert not (dropped & ~mask).any()


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("detector", [d for d in DETECTORS if d != "classifier"])
def test_gradients_reach_every_encoder(fusion, detector):
    torch.manual_seed(0)
    feats, _ = make(32)
    model = build_model(specs(), small(fusion=fusion, detector=detector, d_model=16, latent=4))
    inputs = {m: torch.from_numpy(feats.inputs[m]) for m in feats.modalities}
    loss = training_loss(model, inputs, torch.from_numpy(feats.mask))
    loss.backward()
    assert torch.isfinite(loss)
    used = model.encoders if fusion != "early" else []
    for name in used:
        grads = [p.grad for p in model.encoders[name].parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0, name


# LSTM left out: the CPU's bf16 LSTM (oneDNN) needs bf16 instructions that CI machines may lack; cuDNN runs it on CUDA
BF16_CASES = [(f, d, "gru") for f in FUSIONS for d in DETECTORS] + [("attention", "autoencoder", c)
                                                                   for c in ("tcn", "transformer")]


@pytest.mark.parametrize("fusion,detector,cell", BF16_CASES)
def test_every_pair_trains_a_step_under_bf16_autocast(fusion, detector, cell):
    """The GPU path (`train.gpu`: bf16 autocast on CUDA, `dmafn.training.autocast`) as far as a CPU can take it:
    the same loss under the CPU's bf16 autocast, every modality kind, held channels with channel and modality
    dropout, a modality absent on some rows. A loss term mixing bf16 activations with float32 tensors where
    PyTorch does not promote (an index put, a masked scatter) fails here instead of on the first GPU node."""
    torch.manual_seed(0)
    mods = ("proc", "vib", "cam", "logs", "mic")
    feats, y = make(32, modalities=mods, anomalies=8)
    model = build_model(specs(mods), small(fusion=fusion, detector=detector, series_encoder=cell, d_model=16,
                                           latent=4, modality_dropout=0.3, channel_dropout=0.25)).train()
    inputs = {m: torch.from_numpy(feats.inputs[m]) for m in feats.modalities}
    mask = torch.from_numpy(feats.mask).clone()
    mask[:5, 1] = False                                  # vib absent on the first rows
    held = {"proc": torch.ones(32, 2, dtype=torch.bool), "vib": torch.ones(32, 2, dtype=torch.bool)}
    held["proc"][:4, 1] = False                          # a dead channel
    labels = torch.from_numpy(y.astype(np.float32)) if detector == "classifier" else None
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = training_loss(model, inputs, mask, labels, channels=held)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("fusion", [f for f in FUSIONS if f != "late"])
def test_leave_one_out_errors_reuse_the_forward_encodings(fusion):
    """Scoring passes the forward output in: the same errors as running the encoders again."""
    torch.manual_seed(0)
    feats, _ = make(48)
    model = build_model(specs(), small(fusion=fusion, d_model=16, latent=4)).eval()
    inputs = {m: torch.from_numpy(feats.inputs[m]) for m in feats.modalities}
    mask = torch.from_numpy(feats.mask).clone()
    mask[:8, 0] = False                                  # proc absent on the first rows
    with torch.no_grad():
        out = model(inputs, mask)
        reused, again = model.leave_one_out_errors(inputs, mask, out), model.leave_one_out_errors(inputs, mask)
    assert reused.shape == (48, len(feats.modalities))
    assert torch.allclose(reused, again, equal_nan=True)
    assert torch.isfinite(reused).all()
    with torch.no_grad():                                # one modality hidden at a time, one pass each
        for i, m in enumerate(model.modalities):
            hidden = mask.clone()
            hidden[:, i] = False
            recon = model.heads["fused"](model.fuse(out.tokens, out.targets, hidden)).recon[m]
            err = ((recon - out.targets[m]) ** 2).mean(1)
            assert torch.allclose(reused[:, i], err, atol=1e-5), m


def _fit_and_auc(fusion, detector, kind="cross", epochs=12):
    train, _ = make(768, seed=1)
    test, y = make(400, seed=2, anomalies=60, kind=kind)
    labels = None
    if detector == "classifier":
        epochs = max(epochs, 20)          # supervised from scratch: a few more passes over 768 rows
        train, labels = make(768, seed=1, anomalies=150, kind=kind)
        order = np.random.default_rng(0).permutation(768)
        train.inputs = {m: v[order] for m, v in train.inputs.items()}
        train.mask, labels = train.mask[order], labels[order]
    det = Detector(specs(), small(fusion=fusion, detector=detector, d_model=16, latent=4, modality_dropout=0.3),
                   epochs=epochs, batch_size=64, learning_rate=3e-3, threshold="quantile", quantile=0.99, seed=0)
    det.fit(train, labels)
    return roc_auc(det.decision_function(test), y), det


@pytest.mark.parametrize("detector", DETECTORS)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_pair_ranks_anomalies_above_normal(fusion, detector):
    kind = "cross" if fusion != "late" else "proc"   # late fusion cannot see cross-modal anomalies, by design
    auc, det = _fit_and_auc(fusion, detector, kind)
    assert auc > 0.75, f"{fusion} x {detector}: ROC-AUC {auc:.3f}"
    assert np.isfinite(det.threshold_)


def test_a_classifier_given_no_threshold_method_alarms_at_logit_zero():
    """As a spec without `score.threshold.method`: its validation rows hold labelled anomalies, so a tail of them
    would sit among those; an autoencoder given none keeps POT."""
    train, labels = make(256, seed=1, anomalies=60)
    det = Detector(specs(), small(detector="classifier", d_model=16, latent=4), epochs=2, batch_size=64).fit(train,
                                                                                                           labels)
    assert det.threshold_ == 0.0 and det.calibration_.threshold_method == "fixed"
    assert Detector(specs())._threshold_spec("autoencoder").method == "pot"
    assert Detector(specs(), threshold_value=1.5)._threshold_spec("classifier").value == 1.5


def test_late_fusion_is_blind_to_cross_modal_anomalies_but_fusion_sees_them():
    late, _ = _fit_and_auc("late", "autoencoder", "cross")
    fused, _ = _fit_and_auc("attention", "autoencoder", "cross")
    assert fused > late + 0.15, (fused, late)


def test_audio_modality_trains():
    mods = ("proc", "mic")
    train, _ = make(256, seed=1, modalities=mods)
    test, y = make(200, seed=2, anomalies=30, kind="proc", modalities=mods)
    det = Detector(specs(mods), small(d_model=16, latent=4), epochs=6, batch_size=64, learning_rate=3e-3,
                   threshold="quantile").fit(train)
    assert roc_auc(det.decision_function(test), y) > 0.8


def test_seeded_training_is_reproducible():
    a, _ = _fit_and_auc("gated", "autoencoder", epochs=2)
    b, _ = _fit_and_auc("gated", "autoencoder", epochs=2)
    assert a == pytest.approx(b, abs=1e-6)


def test_state_dict_round_trip_with_weights_only(tmp_path):
    model = build_model(specs(), ModelConfig(d_model=16, latent=4))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    again = build_model(specs(), ModelConfig(d_model=16, latent=4))
    again.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    for (k, v), (_, w) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(v, w), k


def test_adversarial_encoder_still_learns_when_the_discriminator_rejects_its_codes():
    from dmafn.heads import AdversarialHead

    torch.manual_seed(0)
    head = AdversarialHead(D, 4, {"a": 3})
    with torch.no_grad():
        head.discriminator[-1].bias.fill_(-20.0)                  # D(code) ~ 2e-9: codes confidently rejected
    out = head(torch.randn(16, D))
    out.aux_loss.backward()
    encoder_grad = sum(p.grad.norm() for p in head.encode.parameters())
    assert encoder_grad > 1e-2          # non-saturating: -log D(code) still pulls codes towards the prior
    assert out.latent_score.min() > 15  # and the latent term says how unlike the prior the codes are
    head.eval()
    assert head(torch.randn(4, D)).aux_loss is None                # no critic step when scoring


def test_relation_errors_add_to_their_modality_and_only_there():
    """`Features.relation_errors` (a channel away from its relation with the others) is added to its
    modality's raw error, where that modality is present; the other columns are unchanged."""
    from dataclasses import replace

    from dmafn.scoring import raw_scores

    features, _ = make(40)
    features.mask[5, 0] = False
    model = build_model(specs(), small())
    base = raw_scores(model, features).errors
    extra = np.zeros_like(features.mask, np.float32)
    extra[:, 0] = 3.0
    got = raw_scores(model, replace(features, relation_errors=extra)).errors
    np.testing.assert_allclose(np.delete(got, 5, 0)[:, 0], np.delete(base, 5, 0)[:, 0] + 3.0, rtol=1e-5)
    np.testing.assert_allclose(got[:, 1:], base[:, 1:])
    assert np.isnan(got[5, 0])


def test_encoding_density_is_the_gaussian_of_its_encodings():
    """Mean and ridge-regularised covariance from the summed encodings: on the corners of a square (mean (1, 1),
    variance 1 each way) a point 2 along one axis lies 4 / 1.001 / 2 dims away; sums of halves add to the whole;
    too few ticks leave it unfitted with a factor of 1; the sums keep the covariance of encodings far from zero."""
    from dmafn.density import RIDGE, EncodingDensity, EncodingSums

    corners = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    density = EncodingDensity(2, weight=0.5)
    assert not density.fitted and torch.equal(density.factor(torch.ones(3, 2)), torch.ones(3))
    density.fit(EncodingSums.of(corners[:2]) + EncodingSums.of(torch.tensor(corners[2:])))
    assert density.fitted and int(density.ticks) == 4
    got = density.distance(torch.tensor([[1.0, 1.0], [3.0, 1.0], [1.0, -1.0]]))
    torch.testing.assert_close(got, torch.tensor([0.0, 2 / (1 + RIDGE), 2 / (1 + RIDGE)]))
    torch.testing.assert_close(density.factor(torch.tensor([[3.0, 1.0]])), torch.tensor([(2 / (1 + RIDGE)) ** 0.5]))
    density.fit(EncodingSums.of(corners[:2]))                 # 2 ticks for 2 dimensions: no covariance to trust
    assert not density.fitted
    # parts merged pairwise: encodings far from zero beside their spread keep their covariance (a difference of
    # raw sums of outer products, 1e14 against 1, kept none of it), an empty part adds nothing
    far = corners + 1e7
    sums = EncodingSums.of(far[:1]) + EncodingSums.of(far[1:3]) + EncodingSums.zeros(2) + EncodingSums.of(far[3:])
    assert sums.count == 4 and np.allclose(sums.mean, 1e7 + 1, rtol=0, atol=1e-8)
    np.testing.assert_allclose(sums.scatter / sums.count, np.eye(2), rtol=0, atol=1e-8)


def test_encoding_density_leaves_out_what_its_first_fit_calls_atypical():
    """Two passes: 2 % of far-off encodings (incidents in the training history) widen a one-pass fit; the second
    pass sums only the encodings the first fit calls typical (within the chi-square 99.9 % quantile, Wilson-Hilferty:
    1.96 per dimension for 32) and gets the clean Gaussian back, so an incident measured against it stands out.
    (One step: incidents that make up much more of the window widen the first fit enough to hide themselves.)"""
    from dmafn.density import EncodingDensity, EncodingSums

    assert EncodingDensity(32, 1.0).typical_limit == pytest.approx(62.487 / 32, rel=2e-3)   # chi2.ppf(0.999, 32)
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(2000, 4, generator=gen, dtype=torch.float64)
    incidents = torch.randn(40, 4, generator=gen, dtype=torch.float64) * 0.5 + torch.tensor([10.0, 0, 0, 0])
    tokens = torch.cat([clean, incidents])
    density = EncodingDensity(4, 1.0)
    density.fit(EncodingSums.of(tokens))
    one_pass = float(density.distance(incidents[:1]))
    keep = density.typical(tokens)
    assert keep[:2000].float().mean() > 0.99 and not keep[2000:].any()
    density.fit(EncodingSums.of(tokens[keep]))
    assert density.mean.abs().max() < 0.1 and int(density.ticks) == int(keep.sum())
    assert float(density.distance(incidents[:1])) > 2.5 * one_pass


@pytest.mark.parametrize("fusion", ["attention", "gated", "late"])
def test_encoding_distance_multiplies_its_modality_error_and_survives_a_save(fusion):
    """`encoding_distance` on one modality: before the densities are fitted the errors are the model's without
    them; after, that modality's error is multiplied by its encoding's distance ** weight and the others are
    unchanged; the fitted density is part of the saved weights. Every fusion that encodes each modality."""
    from dataclasses import replace

    from dmafn.scoring import raw_scores
    from dmafn.training import fit_densities

    torch.manual_seed(0)
    mods = {**specs(), "cam": replace(specs()["cam"], encoding_distance=0.5)}
    train, _ = make(64, seed=1)
    test, _ = make(24, seed=2)
    model = build_model(mods, small(fusion=fusion, d_model=8, latent=4))
    plain = build_model(specs(), small(fusion=fusion, d_model=8, latent=4))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("densities.")})
    base = raw_scores(plain, test).errors
    np.testing.assert_allclose(raw_scores(model, test).errors, base, rtol=1e-6)      # unfitted: factor 1
    assert fit_densities(model, train) == {"cam": 64}
    got = raw_scores(model, test).errors
    with torch.no_grad():
        tokens = model({m: torch.from_numpy(test.inputs[m]) for m in test.modalities},
                       torch.from_numpy(test.mask)).tokens
        factor = model.densities["cam"].distance(tokens[:, 2]).numpy() ** 0.5
    np.testing.assert_allclose(got[:, 2], base[:, 2] * factor, rtol=1e-5)
    np.testing.assert_allclose(np.delete(got, 2, 1), np.delete(base, 2, 1), rtol=1e-6)
    again = build_model(mods, small(fusion=fusion, d_model=8, latent=4))
    again.load_state_dict(model.state_dict())
    np.testing.assert_allclose(raw_scores(again, test).errors, got, rtol=1e-6)
    with pytest.raises(ValueError, match="encoding_distance on \\['cam'\\]"):
        build_model(mods, small(fusion="early"))


def test_encoding_distance_scores_a_frame_the_autoencoder_reconstructs_well():
    """A camera faded towards grey: the smooth frame reconstructs better than a normal one, so its error alone
    ranks it low; its encoding lies further from the training frames' than any normal frame's does, and with
    `encoding_distance` the camera's contribution ranks it higher."""
    from dataclasses import replace

    train, _ = make(512, seed=1)
    test, _ = make(200, seed=2)
    test.inputs["cam"][100:] = test.inputs["cam"][100:] * 0.3 + 0.7 * test.inputs["cam"][100:].mean()
    y = np.r_[np.zeros(100), np.ones(100)]
    aucs = {}
    for weight in (0.0, 0.5):
        mods = {**specs(), "cam": replace(specs()["cam"], encoding_distance=weight)}
        det = Detector(mods, small(d_model=16, latent=4), epochs=6, batch_size=64, learning_rate=3e-3,
                       threshold="quantile", seed=0).fit(train)
        aucs[weight] = roc_auc(det.score_record(test).contributions[:, 2], y)
    with torch.no_grad():
        distance = det.model_.densities["cam"].distance(det.model_.encoders["cam"](
            torch.from_numpy(test.inputs["cam"]))).numpy()
    assert distance[100:].min() > distance[:100].max()
    assert aucs[0.5] > aucs[0.0] + 0.2, aucs


@pytest.mark.parametrize("fusion", ["attention", "late"])
def test_a_missing_channel_is_left_out_of_its_modalitys_error_and_of_the_loss(fusion):
    """`channels` (m -> (B, C), `Features.channels`): a tabular or series modality's error is the mean over the target
    dimensions of the channels held (a series' pooled steps of each), the plain mean where all are held; the
    leave-one-out errors and the training loss alike; a missing channel's reconstruction gets no gradient."""
    torch.manual_seed(0)
    feats, _ = make(16)
    model = build_model(specs(), small(fusion=fusion, d_model=16, latent=4)).eval()
    inputs = {m: torch.from_numpy(feats.inputs[m]) for m in feats.modalities}
    mask = torch.from_numpy(feats.mask)
    held = {"proc": torch.ones(16, 2, dtype=torch.bool), "vib": torch.ones(16, 2, dtype=torch.bool)}
    held["proc"][:6, 1] = False                          # pressure dead on the first rows
    held["vib"][10:, 0] = False                          # one axis dead on the last
    with torch.no_grad():
        out = model(inputs, mask)
        plain, err = model.errors(out), model.errors(out, held)
        assert torch.equal(model.errors(out, {m: torch.ones_like(h) for m, h in held.items()}), plain)
        squared = {m: (out.recon(m) - out.targets[m]) ** 2 for m in held}
        assert torch.allclose(err[:6, 0], squared["proc"][:6, 0]) and torch.equal(err[6:, 0], plain[6:, 0])
        steps = model.encoders["vib"].pooled_steps                # the target is channel-major: (C, L') flattened
        assert torch.allclose(err[10:, 1], squared["vib"][10:, steps:].mean(1))
        assert torch.allclose(err[:10, 1], plain[:10, 1])
        assert torch.equal(err[:, 2:], plain[:, 2:])
        if fusion != "late":
            loo, loo_held = model.leave_one_out_errors(inputs, mask, out), model.leave_one_out_errors(inputs, mask,
                                                                                                       out, held)
            assert torch.equal(loo_held[6:10], loo[6:10]) and not torch.allclose(loo_held[:6, 0], loo[:6, 0])
    loss = training_loss(model.train(), inputs, mask, channels=held)
    assert torch.isfinite(loss)
    out = model(inputs, mask)
    recon = out.recon("proc")
    (grad,) = torch.autograd.grad(model.errors(out, held)[:, 0].sum(), recon)
    assert (grad[:6, 1] == 0).all() and (grad[6:, 1] != 0).all() and (grad[:, 0] != 0).all()


@pytest.mark.parametrize("fusion", ["attention", "late"])
def test_each_channels_part_of_a_modalitys_error_adds_up_to_it_and_names_the_channel_that_drives_it(fusion):
    """`RawScores.channel_errors`: for a tabular or series modality of two channels or more, each channel's part of
    its raw error (reconstruction, and with cross-modal errors the leave-one-out one; a missing channel's 0) adds up
    to the modality's error; `top_channels` names the largest - the channel a fault is on."""
    from dmafn.scoring import raw_scores, top_channels
    from dmafn.training import fit_model

    torch.manual_seed(0)
    feats, _ = make(64)
    model = build_model(specs(), small(fusion=fusion, d_model=16, latent=4))
    fit_model(model, feats, epochs=3, batch_size=32)
    held = np.ones((64, 2), bool)
    held[:5, 1] = False
    feats.channels = {"proc": held, "vib": np.ones((64, 2), bool)}
    feats.inputs["proc"] = feats.inputs["proc"].copy()
    feats.inputs["proc"][:5, 1] = 0.0
    feats.inputs["proc"][40:, 0] += 6.0                   # a fault on the first channel
    raw = raw_scores(model, feats)
    assert set(raw.channel_errors) == {"proc", "vib"}     # camera and logs have no channels to split
    for i, m in enumerate(("proc", "vib")):
        np.testing.assert_allclose(raw.channel_errors[m].sum(1), raw.errors[:, i], rtol=1e-4)
    assert (raw.channel_errors["proc"][:5, 1] == 0).all()
    names = top_channels(raw.channel_errors["proc"], ("t", "p"))
    assert (names[40:] == "t").all()
    absent = raw.channel_errors["proc"].copy()
    absent[3] = np.nan
    assert top_channels(absent, ("t", "p"))[3] is None and raw.rows(np.arange(4)).channel_errors["proc"].shape == (4, 2)


def test_the_detector_names_the_channel_that_drives_each_rows_error():
    """`Detector.channels`: per tabular or series modality of two channels or more, the channel `top_channels` names
    at each row (as the output's `channel_<m>`); rows with a fault on one channel name it."""
    feats, _ = make(160)
    det = Detector(specs(), small(d_model=16, latent=4), epochs=3, batch_size=32).fit(feats.rows(np.arange(120)))
    test = feats.rows(np.arange(120, 160))
    test.inputs["proc"] = test.inputs["proc"].copy()
    test.inputs["proc"][30:, 1] += 6.0                     # a fault on the second column
    named = det.channels(test)
    assert set(named) == {"proc", "vib"} and len(named["proc"]) == 40
    assert (named["proc"][30:] == "p").all() and set(named["vib"]) <= {"x", "y"}
    # with the scores smoothed, so are the parts the channel is named from: the ticks after a spike on p still name
    # p while a smaller rise of t is the tick's own largest part; a new group (entity and date) starts afresh
    smoothing = Detector(specs(), small(d_model=16, latent=4), epochs=3, batch_size=32, smoothing="ewma", alpha=0.3)
    smoothing.fit(feats.rows(np.arange(120)))
    test = feats.rows(np.arange(120, 140))
    test.inputs["proc"] = test.inputs["proc"].copy()
    test.inputs["proc"][10, 1] += 12.0
    test.inputs["proc"][11:13, 0] += 3.0
    own = smoothing.channels(test, smoothed=False)["proc"]
    assert own[10] == "p" and (own[11:13] == "t").all()
    assert (smoothing.channels(test)["proc"][10:13] == "p").all()
    groups = np.array(["a"] * 11 + ["b"] * 9)
    assert (smoothing.channels(test, groups)["proc"][11:13] == "t").all()


def test_the_cause_is_the_modality_with_the_largest_contribution_no_other_modality_explains():
    """`own_contributions`: a modality's contribution at most, and at most what it keeps with any other hidden - an
    echo of another's fault (b's 5.0, back to 0.3 with a hidden) is not its own; `cause_names`: the largest own one
    of the voting modalities, None where fewer than two vote, the largest contribution where the largest own one
    does not explain it; `Detector.causes`: a process fault names the process,
    a camera fault the camera (where nothing else is off at the same row), an absent modality is never named."""
    from dmafn.scoring import cause_names, own_contributions

    nan = np.nan
    contributions = np.array([[4.0, 5.0, 0.1], [1.0, 2.0, nan], [3.0, nan, nan]])
    hidden = np.array([[[nan, 0.3, 0.2], [4.2, nan, 0.1], [3.9, 5.1, nan]],       # [row, hidden k, modality j]
                       [[nan, 2.5, nan], [0.5, nan, nan], [nan, nan, nan]],
                       [[nan, nan, nan], [nan, nan, nan], [nan, nan, nan]]])
    own = own_contributions(contributions, hidden)
    np.testing.assert_allclose(own, [[3.9, 0.3, 0.1], [0.5, 2.0, nan], [3.0, nan, nan]])
    voting = np.isfinite(contributions)
    assert list(cause_names(contributions, hidden, voting, ("a", "b", "c"))) == ["a", "b", None]
    voting[0, 0] = False                                           # a does not vote (a context view): never named
    assert cause_names(contributions, hidden, voting, ("a", "b", "c"))[0] == "b"
    # a cause must explain the largest contribution (hidden, take `CAUSE_SHARE` of it away): b's echo of a is (row 1);
    # a relation between a and b broken - each explained by the other - leaves c's noise the largest own one, which
    # explains nothing: a, the largest contribution, is named (row 0)
    both = np.array([[4.0, 3.8, 1.0], [3.0, 5.0, 0.1]])
    by_hidden = np.array([[[nan, 0.6, 0.9], [0.5, nan, 1.0], [4.0, 3.8, nan]],
                          [[nan, 0.3, 0.1], [2.9, nan, 0.1], [3.0, 5.0, nan]]])
    every = np.ones((2, 3), bool)
    assert list(cause_names(both, by_hidden, every, ("a", "b", "c"), share=None)) == ["c", "a"]
    assert list(cause_names(both, by_hidden, every, ("a", "b", "c"))) == ["a", "a"]
    feats, _ = make(160)
    det = Detector(specs(), small(d_model=16, latent=4), epochs=4, batch_size=32).fit(feats.rows(np.arange(120)))
    test, _ = make(40, seed=5, anomalies=20, kind="cross")        # the last 20: the process's load shifted
    test.inputs["proc"][:10] += 4.0                                # the first 10: a process fault
    test.inputs["cam"] = test.inputs["cam"].copy()
    test.inputs["cam"][10:20] = np.random.default_rng(2).uniform(0, 1, (10, 1, 16, 16))   # a camera fault
    causes = det.causes(test)
    assert (causes[:10] == "proc").all() and (causes[10:20] == "cam").mean() >= 0.8, causes[:20]
    test.mask = test.mask.copy()
    test.mask[0, 1:] = False                                       # the process alone: nothing to tell apart
    test.mask[[1, 11], 0] = False                                  # the process absent: never named
    again = det.causes(test)
    assert again[0] is None and again[1] in ("vib", "cam", "logs") and again[11] == causes[11]


def test_hiding_a_modality_from_the_relations_that_read_it_leaves_no_echo_through_them_to_name():
    """A vibration fault that breaks the process's cross-modal relation with it raises the process's error through
    the relation; hidden from the model alone the vibration leaves that error, and the process is named. With the
    view of the ticks featurized without the vibration (`views`: the relation on its fit within the process, which
    holds), the echo falls back and the vibration is named; the operating state stays the ticks' own."""
    from dataclasses import replace

    feats, _ = make(160)
    det = Detector(specs(), small(d_model=16, latent=4), epochs=4, batch_size=32).fit(feats.rows(np.arange(120)))
    test, _ = make(40, seed=5)
    proc, vib = test.modalities.index("proc"), test.modalities.index("vib")
    test.inputs["vib"] = test.inputs["vib"].copy()
    test.inputs["vib"][:10] += np.random.default_rng(3).normal(0, 3.0, test.inputs["vib"][:10].shape)   # rough
    relation = np.zeros(test.mask.shape, np.float32)
    relation[:10, proc] = 400.0                        # the process far from where the vibration's level puts it
    test = replace(test, relation_errors=relation)
    mask = test.mask.copy()
    mask[:, vib] = False
    without = replace(test, mask=mask, relation_errors=np.zeros_like(relation),
                      inputs={**test.inputs, "vib": np.zeros_like(test.inputs["vib"])})
    assert (det.causes(test)[:10] == "proc").all()
    assert (det.causes(test, views={"vib": without})[:10] == "vib").all()
    assert (det.causes(test, views={"vib": replace(without, state=np.full((40, 1), np.nan), state_owners=("vib",))})
            [:10] == "vib").all()                      # a view's state is not read
    from dmafn.features import Features

    levels = Features(inputs={"proc": test.inputs["proc"], "vib": without.inputs["vib"]}, mask=mask[:, :2],
                      modalities=("proc", "vib"), relation_errors=np.zeros((40, 2), np.float32))
    assert test.modalities[:2] == ("proc", "vib")     # a view of the sensor modalities alone: read by name
    assert (det.causes(test, views={"vib": levels})[:10] == "vib").all()


def test_an_audio_modalitys_mel_bands_are_its_errors_parts_and_a_tone_names_its_band():
    """An audio modality's error splits into its mel bands' parts (adding up to it; `AudioEncoder.channel_means`),
    named by their centre frequencies (`mel_band_names`): a whine over the hum names the band of its pitch."""
    from dmafn.encoders import mel_band_names, mel_edges
    from dmafn.scoring import raw_scores

    names = mel_band_names(4000)
    assert len(names) == 32 and len(set(names)) == 32 and names[0].endswith(" Hz") and names[-1].endswith(" kHz")
    mods = ("proc", "mic")
    feats, _ = make(200, seed=1, modalities=mods)
    det = Detector(specs(mods), small(d_model=16, latent=4), epochs=3, batch_size=32).fit(feats.rows(np.arange(160)))
    test = feats.rows(np.arange(160, 200))
    raw = raw_scores(det.model_, test)
    np.testing.assert_allclose(raw.channel_errors["mic"].sum(1), raw.errors[:, 1], rtol=1e-4)
    test.inputs["mic"] = test.inputs["mic"].copy()
    t = np.arange(test.inputs["mic"].shape[1]) / 800                              # 800 Hz clips
    test.inputs["mic"][20:] += np.sin(2 * np.pi * 340 * t).astype(test.inputs["mic"].dtype)   # over a 60-260 Hz hum
    named = det.channels(test)["mic"]
    centres = dict(zip(mel_band_names(800), mel_edges(800, 32)[1:-1]))
    near = np.array([abs(centres[n] - 340) < 30 for n in named])                  # the whine's band, or next to it
    assert near[20:].mean() >= 0.8 and near[:20].mean() <= 0.1, named


def test_channel_dropout_hides_held_channels_only_and_keeps_one_per_row():
    torch.manual_seed(0)
    held = {"proc": torch.ones(4000, 3, dtype=torch.bool), "one": torch.ones(4000, 1, dtype=torch.bool)}
    held["proc"][:500, 2] = False                                    # dead already on the first rows
    held["proc"][500:600] = False                                    # the modality absent
    hidden = channel_dropout(held, 0.2)
    assert torch.equal(hidden["one"], held["one"])                  # a one-channel modality is never hidden
    assert not (hidden["proc"] & ~held["proc"]).any()
    assert not hidden["proc"][500:600].any()
    share = 1 - hidden["proc"][600:].float().mean().item()          # the rows holding all three
    assert 0.17 < share < 0.23
    most = channel_dropout(held, 0.9)["proc"]
    assert most[600:].any(1).all()                                   # every row keeps one of its channels
    assert (most[:500, :2].sum(1) == 1).float().mean() > 0.7
    assert channel_dropout(held, 0.0) is held
    # a rate per modality: each its own, a modality left out hides nothing
    both = {"proc": held["proc"], "vib": torch.ones(4000, 4, dtype=torch.bool)}
    apart = channel_dropout(both, {"proc": 0.5, "vib": 0.1})
    assert 0.45 < 1 - apart["proc"][600:].float().mean().item() < 0.55
    assert 0.08 < 1 - apart["vib"].float().mean().item() < 0.12
    assert torch.equal(channel_dropout(both, {"vib": 0.5})["proc"], both["proc"])
    assert channel_dropout(both, {"proc": 0.0}) is both


def test_a_modalitys_own_channel_dropout_is_the_rate_its_channels_train_at(monkeypatch):
    """`modalities.<m>.channel_dropout` (a sensor table's or series' own rate) reaches the network built from the
    spec and is the rate `training_loss` hides that modality's channels at; the others take the model's rate."""
    from dataclasses import replace

    import dmafn.model as model_module

    feats, _ = make(16, seed=0)
    mods = specs(("proc", "vib"))
    mods["proc"] = replace(mods["proc"], channel_dropout=0.6)
    model = build_model(mods, small(d_model=16, latent=4, channel_dropout=0.0))
    assert model.channel_rates == {"proc": 0.6}
    seen = []
    monkeypatch.setattr(model_module, "channel_dropout", lambda held, rates: seen.append(rates) or held)
    inputs = {m: torch.from_numpy(feats.inputs[m]) for m in ("proc", "vib")}
    held = {m: torch.ones(16, x.shape[-1], dtype=torch.bool) for m, x in inputs.items()}
    training_loss(model, inputs, torch.ones(16, 2, dtype=torch.bool), channels=held)
    assert seen == [{"proc": 0.6, "vib": 0.0}]
    training_loss(build_model(specs(("proc", "vib")), small(d_model=16, latent=4, channel_dropout=0.0)), inputs,
                  torch.ones(16, 2, dtype=torch.bool), channels=held)
    assert len(seen) == 1                                  # nothing to hide: the model's rate 0, no own rate


def test_a_hidden_channel_reads_as_a_missing_one():
    tab, series = TabularEncoder(3, D), SeriesEncoder(3, 8, D)
    kept = torch.tensor([[True, False, True], [True, True, True]])
    x = torch.randn(2, 3)
    assert torch.equal(tab.hide_channels(x, kept), torch.where(kept, x, torch.zeros_like(x)))
    w = torch.randn(2, 8, 3)
    assert torch.equal(series.hide_channels(w, kept), torch.where(kept[:, None, :], w, torch.zeros_like(w)))


def test_training_with_channels_hidden_leaves_the_other_modalities_undisturbed_by_a_dead_channel():
    """`channel_dropout`: trained with channels hidden at random, a tick whose channel is dead (0, not held) moves the
    other modalities' errors less than under a model that never saw one missing."""
    from dmafn.training import fit_model
    feats, _ = make(400, seed=1)
    feats.channels = {"proc": np.ones((400, 2), bool), "vib": np.ones((400, 2), bool)}
    test, _ = make(200, seed=2)
    inputs = {m: torch.from_numpy(test.inputs[m]) for m in test.modalities}
    mask = torch.from_numpy(test.mask)
    dead = dict(inputs, proc=inputs["proc"] * torch.tensor([1.0, 0.0]))
    held = {"proc": torch.tensor([[True, False]]).repeat(200, 1), "vib": torch.ones(200, 2, dtype=torch.bool)}
    shift = {}
    for p in (0.0, 0.5):
        model = build_model(specs(), small(d_model=16, latent=4, channel_dropout=p))
        fit_model(model, feats, epochs=40, batch_size=32, seed=0)
        model.eval()
        with torch.no_grad():
            whole = model.leave_one_out_errors(inputs, mask)[:, 1:]
            broken = model.leave_one_out_errors(dead, mask, channels=held)[:, 1:]
        shift[p] = (broken - whole).abs().mean().item()
    assert shift[0.5] < 0.7 * shift[0.0], shift


def test_a_payloads_error_is_held_from_the_tick_its_row_arrived_at_and_carries_across_batches():
    """`hold_payload_errors`: a camera frame (`Features.taken`) read at several ticks keeps the error of the first
    (its channel parts and operating state too) once the machine has moved since; a new row, a new group (entity
    and date) or an absent tick starts afresh; a group's series cut into batches holds as one with the carry."""
    from dmafn.features import Features
    from dmafn.scoring import hold_payload_errors

    errors = np.array([[1.0, 10], [2, 20], [3, 30], [4, 40], [5, 50], [6, 60], [7, 70]])
    parts = {"proc": errors[:, 1:] * np.array([[0.25, 0.75]])}
    taken = {"cam": np.array([5, 5, 5, 9, 9, -1, 9]), "proc": np.array([1, 1, 2, 3, 4, 5, 5])}
    groups = np.array(["a", "a", "a", "a", "a", "a", "b"])
    state = np.arange(14.0).reshape(7, 2)                         # the operating state each tick is at
    feats = Features({"cam": np.zeros((7, 1)), "proc": np.zeros((7, 2))}, np.ones((7, 2), bool), ("cam", "proc"),
                     state=state, state_owners=("proc", "cam"), taken=taken, groups=groups)
    held, held_parts, held_state, prior = hold_payload_errors(errors, parts, feats)
    assert held[:, 0].tolist() == [1, 1, 1, 4, 4, 6, 7]
    assert held[:, 1].tolist() == [10, 10, 30, 40, 50, 60, 70]
    assert held_parts["proc"][:, 1].tolist() == [7.5, 7.5, 22.5, 30, 37.5, 45, 52.5]
    assert held_state["cam"][:, 0].tolist() == [0, 0, 0, 6, 6, 10, 12]    # the state its held error was read at
    assert errors[1, 0] == 2 and parts["proc"][1, 1] == 15          # the inputs are left as they were
    assert not prior                                   # every modality here owns state columns: no frame or clip
    carry: dict = {}
    first = hold_payload_errors(errors[:2], {"proc": parts["proc"][:2]}, feats.rows(slice(0, 2)), carry)
    rest = hold_payload_errors(errors[2:], {"proc": parts["proc"][2:]}, feats.rows(slice(2, 7)), carry)
    assert np.array_equal(np.r_[first[0], rest[0]], held)
    assert np.array_equal(np.r_[first[1]["proc"], rest[1]["proc"]], held_parts["proc"])
    for m in ("cam", "proc"):
        assert np.array_equal(np.r_[first[2][m], rest[2][m]], held_state[m])
    # while the machine stays where it was when the row came (its state within HOLD_STATE_MOVE), each tick reads
    # the payload afresh; where the move cannot be read (a state column absent), it holds
    still = np.zeros((7, 2))
    still[2, 0] = np.nan
    feats.state = still
    read, read_parts, read_state, _ = hold_payload_errors(errors, parts, feats)
    assert read[:, 0].tolist() == [1, 2, 1, 4, 5, 6, 7] and read[:, 1].tolist() == [10, 20, 30, 40, 50, 60, 70]
    assert np.array_equal(read_parts["proc"], parts["proc"])
    assert np.array_equal(read_state["cam"], np.zeros((7, 2)))       # tick 2 held: the state its frame came at


def test_a_frame_that_came_while_the_machine_moved_keeps_the_state_at_the_tick_before_and_carries_across_batches():
    """`hold_payload_errors`' prior state: for a modality with no level of its own (a frame, a clip) that came while
    the operating state moved more than `HOLD_STATE_MOVE` since the tick before, the state at that tick, for every
    tick its row stays the latest; elsewhere (the machine still, a group's first tick) its held state; batches with
    the carry give what the whole gives, a frame's first tick in a batch reading the tick before from the carry."""
    from dmafn.features import Features
    from dmafn.scoring import hold_payload_errors

    state = np.array([[0.0, 0], [0, 0], [3, 3], [3, 3], [3, 3], [3.1, 3.1], [1, 1], [1.1, 1.1]])
    taken = {"cam": np.array([1, 1, 2, 2, 2, 2, 4, 5]), "proc": np.arange(8)}
    groups = np.array(["a"] * 6 + ["b"] * 2)
    errors, parts = np.ones((8, 2)), {"proc": np.ones((8, 2))}
    feats = Features({"cam": np.zeros((8, 1)), "proc": np.zeros((8, 2))}, np.ones((8, 2), bool), ("cam", "proc"),
                     state=state, state_owners=("proc", "proc"), taken=taken, groups=groups)
    _, _, held_state, prior = hold_payload_errors(errors, parts, feats)
    assert set(prior) == {"cam"}                                   # the process has a level: no prior
    # frame 2 came at tick 2, the machine having moved 3 stds since tick 1: the state at tick 1 while it is the latest
    assert prior["cam"][:, 0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1.1]
    assert np.array_equal(prior["cam"][[0, 1, 6, 7]], held_state["cam"][[0, 1, 6, 7]])   # still, or no tick before
    for cuts in ((2,), (3,), (2, 5)):
        carry: dict = {}
        edges = [0, *cuts, 8]
        pieces = [hold_payload_errors(errors[a:b], {"proc": parts["proc"][a:b]}, feats.rows(slice(a, b)), carry)
                  for a, b in zip(edges, edges[1:])]
        assert np.array_equal(np.concatenate([p[3]["cam"] for p in pieces]), prior["cam"]), cuts


def test_a_version_with_held_payloads_reads_a_stale_frame_against_the_state_it_was_taken_in():
    """`raw_scores` with `hold_payloads`: while the camera's frame stays the latest its error (own and cross-modal)
    is the one it had when it arrived, however the process moves; the process's error moves; an older version
    reads the frame afresh at every tick; a shard's batches hold as one (`hold` carried)."""
    from dmafn.scoring import RawScores, raw_scores

    from dmafn.model import model_config
    from dmafn.spec import ModelSpec

    assert model_config(ModelSpec()).hold_payloads and not ModelConfig().hold_payloads   # older manifests: as before
    feats, _ = make(6, seed=3, modalities=("proc", "cam"))
    feats.inputs["cam"][1:3] = feats.inputs["cam"][0]            # one frame read at ticks 0-2, another at 3-5
    feats.inputs["cam"][4:6] = feats.inputs["cam"][3]
    feats.taken = {"cam": np.array([0, 0, 0, 3, 3, 3]), "proc": np.arange(6)}
    feats.groups = np.array(["pump-1|2024-01-02"] * 6)
    errors, raws = {}, {}
    for hold in (True, False):
        torch.manual_seed(0)
        model = build_model(specs(("proc", "cam")), small(d_model=16, latent=4, hold_payloads=hold))
        raws[hold] = raw_scores(model, feats)
        errors[hold] = raws[hold].errors
    held, fresh = errors[True], errors[False]
    # beside the held reading, each tick's own (what `settle_held` weighs it against); none without the hold
    assert np.allclose(raws[True].fresh_errors["cam"], fresh[:, 1]) and set(raws[True].fresh_errors) == {"proc", "cam"}
    assert np.allclose(raws[True].fresh_channel_errors["proc"], raws[False].channel_errors["proc"])
    assert not raws[False].fresh_errors and not raws[False].fresh_channel_errors
    assert np.ptp(held[:3, 1]) == 0 and np.ptp(held[3:, 1]) == 0 and held[3, 1] != held[0, 1]
    assert np.allclose(held[[0, 3], 1], fresh[[0, 3], 1]) and np.ptp(fresh[:3, 1]) > 0
    assert np.allclose(held[:, 0], fresh[:, 0])                   # the process's own error is read at each tick
    carry: dict = {}
    torch.manual_seed(0)
    model = build_model(specs(("proc", "cam")), small(d_model=16, latent=4, hold_payloads=True))
    parts = [raw_scores(model, feats.rows(rows), hold=carry) for rows in (slice(0, 2), slice(2, 6))]
    joined = RawScores.concatenate(parts)
    assert np.allclose(joined.errors, held) and np.allclose(joined.fresh_errors["cam"], fresh[:, 1])
