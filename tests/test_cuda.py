"""The GPU path (`train.gpu: true`: CUDA, bf16 autocast, DDP over NCCL) on a CUDA device; skipped where there is none
(CI, this project's CPU machines). On a GPU machine: `python3 -m pytest -q tests/test_cuda.py` from the repository
root - it needs only torch, numpy, pyarrow, pyyaml and pytest (no Ray, Delta or Polars). What a CPU can check of this
path runs in every test run (`test_model.py::test_every_pair_trains_a_step_under_bf16_autocast`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dmafn.detector import Detector
from dmafn.metrics import roc_auc
from dmafn.model import build_model, small
from dmafn.scoring import raw_scores
from dmafn.spec import DETECTORS, FUSIONS, SERIES_ENCODERS
from dmafn.training import fit_model, train_step
from tests.modeldata import make, specs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

MODS = ("proc", "vib", "cam", "logs", "mic")
CUDA = torch.device("cuda")


def _batch(n: int = 64):
    """Every modality kind, a quarter of the rows anomalous (for the classifier), a dead channel on a few rows."""
    feats, y = make(n, modalities=MODS, anomalies=n // 4)
    feats.channels = {"proc": np.ones((n, 2), bool), "vib": np.ones((n, 2), bool)}
    feats.channels["proc"][:4, 1] = False
    feats.mask[:5, 1] = False                            # vib absent on the first rows
    return feats, y


def _trains(model, feats, labels, loss_model=None) -> None:
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    losses = [train_step(model, opt, feats, labels, CUDA, bf16=True, loss_model=loss_model) for _ in range(3)]
    assert np.isfinite(losses).all(), losses
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("detector", DETECTORS)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_pair_trains_on_cuda_under_bf16(fusion, detector):
    torch.manual_seed(0)
    feats, y = _batch()
    model = build_model(specs(MODS), small(fusion=fusion, detector=detector, d_model=16, latent=4,
                                           modality_dropout=0.3, channel_dropout=0.25)).to(CUDA)
    _trains(model, feats, y if detector == "classifier" else None)


@pytest.mark.parametrize("cell", SERIES_ENCODERS)
def test_every_series_encoder_trains_on_cuda_under_bf16(cell):
    torch.manual_seed(0)
    feats, _ = _batch()
    _trains(build_model(specs(MODS), small(series_encoder=cell, d_model=16, latent=4)).to(CUDA), feats, None)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_scores_on_cuda_are_the_scores_on_the_cpu(fusion):
    """`raw_scores` (float32, no autocast) on the GPU: the CPU's errors and latent terms to float32 rounding, summed in
    another order (TF32 off, so a convolution or product is not rounded to 10 bits)."""
    tf32, precision = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        _scores_agree(fusion)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        torch.set_float32_matmul_precision(precision)


def _scores_agree(fusion: str) -> None:
    torch.manual_seed(0)
    train, _ = make(256, seed=1, modalities=MODS)
    model = build_model(specs(MODS), small(fusion=fusion, d_model=16, latent=4))
    fit_model(model, train, epochs=2, batch_size=64, seed=0)
    test, _ = make(128, seed=2, modalities=MODS, anomalies=20)
    test.mask[:10, 2] = False                            # cam absent on a few rows
    cpu = raw_scores(model.eval(), test)
    gpu = raw_scores(model.to(CUDA).eval(), test, device="cuda")
    np.testing.assert_allclose(gpu.errors, cpu.errors, rtol=1e-3, atol=1e-5)
    if cpu.latent is not None:
        np.testing.assert_allclose(gpu.latent, cpu.latent, rtol=1e-3, atol=1e-5)


def test_the_detector_fits_and_ranks_on_cuda():
    train, _ = make(768, seed=1)
    test, y = make(400, seed=2, anomalies=60, kind="cross")
    det = Detector(specs(), small(fusion="attention", d_model=16, latent=4, modality_dropout=0.3), epochs=12,
                   batch_size=64, learning_rate=3e-3, threshold="quantile", quantile=0.99, seed=0, device="cuda")
    det.fit(train)
    assert roc_auc(det.decision_function(test), y) > 0.75
    assert np.isfinite(det.threshold_)


def test_ddp_over_nccl_trains_under_bf16_as_the_pipeline_wraps_it(tmp_path):
    """One process of a DDP group over NCCL, the model wrapped as `pipelines.train` has Ray wrap it
    (`find_unused_parameters=True`: modality dropout and late fusion leave some parameters without a gradient)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        for fusion in FUSIONS:
            torch.manual_seed(0)
            feats, _ = _batch()
            model = build_model(specs(MODS), small(fusion=fusion, d_model=16, latent=4, modality_dropout=0.5)).to(CUDA)
            wrapped = DistributedDataParallel(model, device_ids=[0], find_unused_parameters=True)
            _trains(model, feats, None, loss_model=wrapped)
    finally:
        dist.destroy_process_group()
