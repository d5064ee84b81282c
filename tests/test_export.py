"""`longtail export`: a torch.export program that plain PyTorch runs without longtail."""

import json
import subprocess
import sys

import pytest
import torch

import longtail
from conftest import REPO, tiny_arrays, tiny_config
from longtail.cli import main
from longtail.config import config_from_dict
from longtail.runs import train_run

# Runs in a fresh interpreter: any attempt to import longtail fails, and none may be loaded.
PLAIN_TORCH = r"""
import sys
class NoLongtail:
    def find_spec(self, name, path=None, target=None):
        if name == "longtail" or name.startswith("longtail."):
            raise ImportError("longtail must not be needed to run an exported model")
sys.meta_path.insert(0, NoLongtail())
import json, torch
model_path, inputs_path, outputs_path = sys.argv[1:4]
extra = {"longtail.json": ""}
program = torch.export.load(model_path, extra_files=extra)
net = program.module()
inputs = torch.load(inputs_path)
with torch.no_grad():
    outputs = {name: net(x) for name, x in inputs.items()}
torch.save(outputs, outputs_path)
assert "longtail" not in sys.modules
print(json.dumps({"classes": json.loads(extra["longtail.json"])["class_names"],
                  "modules": sorted(m for m in sys.modules if m.startswith("longtail"))}))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A cosine-head run (the predict tests cover the linear head), exported through the CLI."""
    root = tmp_path_factory.mktemp("export")
    cfg = config_from_dict(tiny_config(**{"model.head": "cosine", "train.epochs": 1}))
    train_run(cfg, root / "run", arrays=tiny_arrays(num_classes=5))
    assert main(["export", str(root / "run"), "--out", str(root / "model.pt2")]) == 0
    return root


def test_exported_file_runs_without_longtail_and_gives_the_same_logits(exported, tmp_path):
    images = tiny_arrays(num_classes=5)["test_images"]
    inputs = {"batch": torch.from_numpy(images[:7]), "single": torch.from_numpy(images[7:8])}
    torch.save(inputs, tmp_path / "inputs.pt")
    proc = subprocess.run([sys.executable, "-c", PLAIN_TORCH, str(exported / "model.pt2"), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "outputs.pt")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"classes": ["0", "1", "2", "3", "4"], "modules": []}
    outputs = torch.load(tmp_path / "outputs.pt")
    predictor = longtail.load(exported / "run", device="cpu")
    for name, x in inputs.items():
        expected = predictor.logits(x.numpy())
        assert outputs[name].shape == expected.shape == (len(x), 5)
        torch.testing.assert_close(outputs[name], expected, atol=1e-5, rtol=0)
    assert outputs["batch"].abs().max() <= 1.0 + 1e-6  # cosine head: logits are cosines


def test_metadata_and_input_guards(exported):
    extra = {"longtail.json": ""}
    net = torch.export.load(str(exported / "model.pt2"), extra_files=extra).module()
    meta = json.loads(extra["longtail.json"])
    data = json.loads((exported / "run" / "data.json").read_text())
    assert meta["class_names"] == data["class_names"] and meta["class_counts"] == data["class_counts"]
    assert meta["image_shape"] == [8, 8] and meta["channels"] == 3 and meta["mean"] == data["mean"]
    assert meta["input"] == "uint8 (B, 8, 8, 3), B >= 1" and meta["epoch"] == 1
    with torch.no_grad():
        assert net(torch.zeros(3, 8, 8, 3, dtype=torch.uint8)).shape == (3, 5)
        for bad in (torch.zeros(2, 8, 8, 3), torch.zeros(2, 9, 8, 3, dtype=torch.uint8),
                    torch.zeros(2, 8, 8, 1, dtype=torch.uint8)):
            with pytest.raises((RuntimeError, AssertionError)):
                net(bad)


def test_export_errors(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "m.pt2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longtail: error: run folder not found") and err.count("\n") == 1
    assert not (tmp_path / "m.pt2").exists()
