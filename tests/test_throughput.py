"""Speed options (train.precision, train.compile validation, device-resident batches) and the
throughput benchmark script (one real subprocess call; no timed asserts)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, benchmark_script, full_and_resumed, tiny_arrays, tiny_config
from longtail.config import config_from_dict
from longtail.data.build import build_data
from longtail.errors import ConfigError
from longtail.io import safe_torch_load
from longtail.engine.loop import Trainer, TrainForward, resident_split


class _NoBar:
    def set_description(self, *a, **k):
        pass

    update = set_postfix = set_description


def _trainer(tmp_path, **over):
    cfg = config_from_dict(tiny_config(**over))
    data = build_data(cfg.data, arrays=tiny_arrays())
    return Trainer(cfg, data, tmp_path)


def test_precision_and_compile_are_validated():
    assert config_from_dict(tiny_config(**{"train.precision": "bf16"})).train.precision == "bf16"
    assert config_from_dict({}).train.precision == "auto"  # the default (bf16 on a CPU with native bf16)
    assert config_from_dict(tiny_config()).train.compile is False
    with pytest.raises(ConfigError, match=r"'train.precision' must be one of fp32, bf16, auto, got 'fp16'"):
        config_from_dict(tiny_config(**{"train.precision": "fp16"}))
    with pytest.raises(ConfigError, match="did you mean 'bf16'"):
        config_from_dict(tiny_config(**{"train.precision": "bf61"}))
    with pytest.raises(ConfigError, match="'train.compile' must be bool"):
        config_from_dict(tiny_config(**{"train.compile": "yes"}))


def test_bf16_forward_is_autocast_with_fp32_outputs_and_weights(tmp_path):
    trainer = _trainer(tmp_path, **{"train.precision": "bf16"})
    images = torch.randn(6, 3, 8, 8)
    pooled, logits = trainer.forward(images)
    assert pooled.dtype == logits.dtype == torch.float32
    fp32_logits = TrainForward(trainer.model)(images)[1]
    assert not torch.equal(logits, fp32_logits)  # the pass really ran in bf16 ...
    assert torch.allclose(logits, fp32_logits, rtol=0.05, atol=0.05)  # ... and stays close to fp32
    row = trainer.train_epoch(0, _NoBar())
    assert torch.isfinite(torch.tensor(row["train_loss"])) and row["train_loss"] > 0
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in trainer.model.parameters())


def test_bf16_resume_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = tiny_config(**{"train.epochs": 2, "train.precision": "bf16"})
    _, _, cut = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(),
                                 evaluate=False)
    assert cut["epoch"] == 1
    a = safe_torch_load(tmp_path / "full/checkpoints/last.pt")["model"]
    b = safe_torch_load(tmp_path / "cut/checkpoints/last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_device_resident_batches_train_identically(tmp_path):
    """The GPU path (training images held on the device, batches gathered there) gives the
    same epoch as batches copied from host memory; exercised here on the CPU."""
    host = _trainer(tmp_path / "a")
    resident = _trainer(tmp_path / "b")
    resident._resident = resident_split(resident.data.train, torch.device("cpu"), max_bytes=1 << 30)
    assert resident._resident[0].shape == (len(resident.data.train), 8, 8, 3)
    assert resident_split(resident.data.train, torch.device("cpu"), max_bytes=100) is None
    a, b = host.train_epoch(0, _NoBar()), resident.train_epoch(0, _NoBar())
    assert (a["train_loss"], a["train_top1"]) == (b["train_loss"], b["train_top1"])
    assert all(torch.equal(p, q) for p, q in zip(host.model.parameters(), resident.model.parameters()))


@pytest.mark.slow
def test_throughput_script_quick_run(tmp_path):
    out = tmp_path / "throughput.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--quick", "--data", "random",
         "--fastest", "train.channels_last=false", "--pipelines", "classic,default,fastest,ddp2", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    for field in ("classic", "default", "fastest", "img/s", "GFLOP/s", "b/a (default / classic):",
                  "c/a (fastest / classic):", "measured peak fp32", "3x3 conv", "RSS"):
        assert field in text, field
    res = json.loads(out.read_text())
    rows = res["pipelines"]
    assert set(rows) == {"classic", "default", "fastest", "ddp2"}
    for row in rows.values():
        assert row["images"] == 2 * 16 and row["images_per_s"] > 0 and row["peak_rss_mib"] > 0
        assert row["achieved_gflops"] > 0 and 0 < row["fraction_of_conv_peak"]
    assert rows["classic"]["worker_peak_rss_mib"] > 0 and rows["fastest"]["overrides"] == ["train.channels_last=false"]
    # two data-parallel processes, one thread each, count the global batches
    assert rows["ddp2"]["processes"] == 2 and rows["ddp2"]["threads"] == 1
    assert "in 2 data-parallel processes" in text
    assert res["ratio_b_over_a"] == pytest.approx(rows["default"]["images_per_s"] / rows["classic"]["images_per_s"])
    # ResNet-32 (option A), forward + backward, per image: 3 x 68,862,592 MACs x 2 FLOPs, minus the
    # input gradient of the first convolution (3->16 channels, 32x32, not needed for the images)
    assert res["peaks"]["flops_per_image"] == 3 * 2 * 68_862_592 - 2 * 3 * 16 * 9 * 32 * 32


def test_ddp_pipeline_is_cpu_only():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--device", "cuda",
                           "--pipelines", "default,ddp2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "ddp2 runs on the CPU only (--device cpu)" in proc.stderr


def test_graph_pipelines_are_cuda_only():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--device", "cpu",
                           "--pipelines", "default,graph_lazy"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "graph_lazy needs CUDA (--device cuda)" in proc.stderr


def test_costs_mode_refuses_a_folder_without_metrics(tmp_path, capsys):
    script = benchmark_script("throughput")
    assert script.main(["--costs", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"throughput: error: {tmp_path} is not a trained run folder (no metrics.jsonl)"
