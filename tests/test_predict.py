"""longtail.load / Predictor, logit adjustment and `longtail predict` on generated image files."""

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import longtail
from conftest import REPO, tiny_arrays, tiny_config
from longtail.cli import main
from longtail.config import config_from_dict
from longtail.errors import CheckpointError, ConfigError, DataError
from longtail.logit_adjust import read_prior_file
from longtail.runs import train_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "run"
    train_run(config_from_dict(tiny_config()), out, arrays=tiny_arrays())
    return out


@pytest.fixture(scope="module")
def predictor(run):
    return longtail.load(run, device="cpu")


@pytest.fixture(scope="module")
def test_images():
    a = tiny_arrays()
    return a["test_images"], a["test_labels"]


@pytest.fixture
def image_folder(tmp_path, test_images):
    """8 PNGs of the test set in nested folders, a corrupt PNG, an empty JPEG, a 16x16 image, a text file."""
    images, _ = test_images
    root = tmp_path / "images"
    for i in range(8):
        folder = root / ("sub" if i % 2 else "") / ("deeper" if i == 7 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i * 3]).save(folder / f"img{i}.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image, ignored")
    Image.fromarray(np.kron(images[1], np.ones((2, 2, 1), dtype=np.uint8))).save(root / "big.png")
    return root


def test_load_reproduces_the_runs_evaluation_logits(run, predictor, test_images):
    images, _ = test_images
    stored = np.load(run / "predictions.npz")["logits"]
    assert predictor.epoch == 2 and predictor.class_names == ["0", "1", "2", "3"]
    assert predictor.spec.shape == (8, 8, 3) and not predictor.model.training
    np.testing.assert_allclose(predictor.logits(images).numpy(), stored, atol=1e-5, rtol=0)
    np.testing.assert_allclose(predictor.logits(images, batch_size=5).numpy(), stored, atol=1e-5, rtol=0)


def test_every_input_kind_gives_the_same_logits(predictor, test_images, tmp_path):
    images, _ = test_images
    x = images[:4]
    ref = predictor.logits(x)
    paths = []
    for i, img in enumerate(x):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    chw = torch.from_numpy(x).permute(0, 3, 1, 2)
    same = {
        "PIL images": [Image.fromarray(img) for img in x],
        "HWC arrays": list(x),
        "RGBA arrays (alpha dropped)": [np.concatenate([img, np.full((8, 8, 1), 7, np.uint8)], axis=2) for img in x],
        "uint8 CHW tensor batch": chw,
        "list of CHW tensors": list(chw),
        "file paths": paths,
        "mixed list": [paths[0], Image.fromarray(x[1]), x[2], chw[3]],
    }
    for name, given in same.items():
        assert torch.equal(predictor.logits(given), ref), name
    np.testing.assert_allclose(predictor.logits(chw.float() / 255).numpy(), ref.numpy(), atol=1e-5, err_msg="float")
    gray = Image.fromarray(x[0]).convert("L")
    assert torch.equal(predictor.logits(gray), predictor.logits(np.repeat(np.asarray(gray)[:, :, None], 3, axis=2)))
    big = Image.fromarray(x[0]).resize((20, 12), Image.Resampling.NEAREST)
    resized = big.resize((8, 8), Image.Resampling.BILINEAR)
    assert torch.equal(predictor.logits(big), predictor.logits(resized))
    assert predictor.logits(x[0]).shape == (1, 4) and predictor.features(x).shape == (4, 8)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((8, 8, 3), np.float32), "must be uint8"),
    (np.zeros((8, 8, 2), np.uint8), "C in 1, 3, 4"),
    (torch.zeros(2, 5, 8, 8), "C in 1, 3"),
    ([], "no images given"),
    (42, "cannot classify an object of type int"),
])
def test_bad_inputs_are_one_line_errors(predictor, bad, message):
    with pytest.raises(ConfigError, match=message):
        predictor.logits(bad)


def test_logit_adjustment_formula(predictor, test_images, tmp_path):
    images, _ = test_images
    raw = predictor.logits(images).double()
    n = np.array(predictor.class_counts, dtype=np.float64)
    pi_train = torch.from_numpy(n / n.sum())

    def probs(**kw):
        return torch.from_numpy(predictor.predict(images, k=4, **kw).probs).double()

    def expected(shift):
        return torch.softmax(raw + shift, dim=1)

    assert torch.allclose(probs(), expected(-torch.log(pi_train)), atol=1e-6)  # uniform target, tau 1
    assert torch.allclose(probs(prior="train"), expected(torch.zeros(4)), atol=1e-6)
    assert torch.allclose(probs(tau=0.5), expected(-0.5 * torch.log(pi_train)), atol=1e-6)
    assert torch.allclose(probs(tau=0.0), expected(torch.zeros(4)), atol=1e-6)
    target = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64) / 10
    assert torch.allclose(probs(prior=[1, 2, 3, 4]), expected(torch.log(target) - torch.log(pi_train)), atol=1e-6)
    assert n[0] > n[-1]  # long-tailed: the uniform target moves probability to the tail
    assert probs()[:, 3].mean() > probs(prior="train")[:, 3].mean()

    files = {"w.json": json.dumps([1, 2, 3, 4]), "named.json": json.dumps({"3": 4, "1": 2, "0": 1, "2": 3}),
             "w.csv": "class,weight\n0,1\n1,2\n# comment\n\n2,3\n3,4\n", "w.txt": "1\n2\n3\n4\n",
             "tabs.tsv": "2\t3\n0\t1\n3\t4\n1\t2\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        assert np.allclose(read_prior_file(tmp_path / name, predictor.class_names), target.numpy()), name
        assert torch.allclose(probs(prior=str(tmp_path / name)), probs(prior=[1, 2, 3, 4])), name
    zero = predictor.predict(images, k=4, prior=[1, 1, 0, 1])
    assert (zero.probs[:, 2] == 0).all() and "2" not in zero.labels


@pytest.mark.parametrize("name, text, message", [
    ("short.txt", "1\n2\n3\n", "has 3 weights, the run has 4 classes"),
    ("neg.txt", "1\n-2\n3\n4\n", "weights must be finite and >= 0, got -2.0"),
    ("nan.json", "[1, NaN, 1, 1]", "weights must be finite and >= 0, got nan"),
    ("zero.txt", "0\n0\n0\n0\n", "all weights are zero"),
    ("typo.csv", "0,1\n1,1\n2,1\n33,1\n", "unknown class '33'"),
    ("missing.csv", "0,1\n1,1\n2,1\n", "has no weight for class(es) 3"),
    ("twice.csv", "0,1\n1,1\n2,1\n2,1\n3,1\n", "class '2' is given twice"),
    ("mixed.txt", "1\n1,2\n3\n4\n", "mixes 'weight' and 'name,weight' lines"),
    ("word.txt", "1\n2\nthree\n4\n", "weight 'three' is not a number"),
    ("bad.json", "[1, 2,", "is not valid JSON"),
    ("obj.json", '{"0": "a"}', "weight of class '0' must be a number"),
])
def test_bad_prior_files_are_one_line_errors(predictor, tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        predictor.predict(np.zeros((1, 8, 8, 3), np.uint8), prior=str(tmp_path / name))
    assert "\n" not in str(info.value)


def test_bad_options(predictor):
    x = np.zeros((1, 8, 8, 3), np.uint8)
    with pytest.raises(DataError, match="no such file: nowhere.txt"):
        predictor.predict(x, prior="nowhere.txt")
    for kw, message in (({"k": 0}, "k must be an integer >= 1"), ({"k": 2.5}, "k must be an integer"),
                        ({"tau": -1.0}, "tau must be a finite number >= 0"), ({"batch_size": 0}, "batch_size")):
        with pytest.raises(ConfigError, match=message):
            predictor.predict(x, **kw)
    assert predictor.predict(x, k=50).top_probs.shape == (1, 4)  # k capped at C


def test_load_errors(run, tmp_path):
    with pytest.raises(CheckpointError, match="run folder not found"):
        longtail.load(tmp_path / "none")
    with pytest.raises(CheckpointError, match="not a run folder"):
        longtail.load(tmp_path)
    with pytest.raises(CheckpointError, match="no best_val checkpoint"):
        longtail.load(run, checkpoint="best_val")
    with pytest.raises(ConfigError, match="checkpoint must be one of last, best_val"):
        longtail.load(run, checkpoint="best")
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "data.json").unlink()
    with pytest.raises(CheckpointError, match="has no data.json"):
        longtail.load(copy)


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_cli_on_a_folder_with_broken_files(run, predictor, image_folder, test_images, tmp_path, capsys):
    images, _ = test_images
    out = tmp_path / "pred.csv"
    extra = image_folder / "sub" / "img1.png"  # named twice (folder and file): one row
    code = main(["predict", str(run), str(image_folder), str(extra), "--out", str(out), "--k", "9", "--no-progress"])
    assert code == 0
    captured = capsys.readouterr()
    assert "9 classified, 2 unreadable" in captured.out
    assert captured.err.strip().startswith("longtail: warning: 2 file(s) could not be read")
    rows = _read_csv(out)
    columns = [f"top{i}_{x}" for i in range(1, 5) for x in ("class", "prob")]
    assert list(rows[0]) == ["path", "status", "error", *columns]
    by_name = {r["path"].split("/")[-1]: r for r in rows}
    assert len(rows) == 11 and "notes.txt" not in by_name
    assert [r["path"] for r in rows] == sorted((r["path"] for r in rows),
                                               key=lambda p: (p.count("/"), p))  # walk order: folder, then sub-folders
    assert by_name["corrupt.png"]["status"] == "error" and "cannot decode image" in by_name["corrupt.png"]["error"]
    assert "BytesIO" not in by_name["corrupt.png"]["error"]
    assert by_name["empty.jpg"]["error"].startswith("image file is empty (0 bytes)")
    assert by_name["empty.jpg"]["top1_class"] == "" and by_name["empty.jpg"]["top1_prob"] == ""
    for i in range(8):
        row = by_name[f"img{i}.png"]
        pred = predictor.predict(images[i * 3], k=4)
        assert row["status"] == "ok" and row["error"] == ""
        assert [row[f"top{j}_class"] for j in range(1, 5)] == pred.top_classes[0]
        probs = [float(row[f"top{j}_prob"]) for j in range(1, 5)]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert probs == pytest.approx(pred.top_probs[0].tolist(), abs=1e-6)


def test_predict_cli_prior_and_errors(run, image_folder, tmp_path, capsys):
    out = tmp_path / "p.csv"
    (tmp_path / "prior.txt").write_text("1\n1\n1\n1\n")
    assert main(["predict", str(run), str(image_folder / "img0.png"), "--out", str(out), "--prior",
                 str(tmp_path / "prior.txt"), "--no-progress"]) == 0
    uniform_file = _read_csv(out)
    assert main(["predict", str(run), str(image_folder / "img0.png"), "--out", str(out), "--no-progress"]) == 0
    assert _read_csv(out) == uniform_file  # a file of equal weights is the uniform prior
    capsys.readouterr()
    for args, message in (([str(tmp_path / "nowhere")], "no such file or folder"),
                          ([str(image_folder), "--k", "0"], "k must be an integer >= 1"),
                          ([str(image_folder), "--tau", "-1"], "tau must be a finite number >= 0"),
                          ([str(image_folder), "--prior", str(tmp_path / "no.txt")],
                           "prior must be auto, uniform, train or a file"),
                          ([str(tmp_path / "empty_dir")], "no image files under"),
                          ([str(image_folder), "--batch-size", "0"], "batch size must be an integer >= 1")):
        (tmp_path / "empty_dir").mkdir(exist_ok=True)
        assert main(["predict", str(run), *args, "--out", str(tmp_path / "x.csv"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("longtail: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.csv").exists()
    assert main(["predict", str(run), str(image_folder), "--out", str(tmp_path), "--no-progress"]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "norun"), str(image_folder), "--no-progress"]) == 2
    assert "run folder not found" in capsys.readouterr().err


def _rebalanced_copy(run, tmp_path):
    """The run's folder with a class-balanced loss in its config.yaml (the weights stay CE's)."""
    copy = tmp_path / "cb"
    shutil.copytree(run, copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["loss"] = {"name": "class_balanced", "params": {}}
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    return copy


def test_predict_notes_a_rebalanced_run(run, image_folder, tmp_path, capsys):
    copy = _rebalanced_copy(run, tmp_path)
    args = ["predict", str(copy), str(image_folder / "img0.png"), "--out", str(tmp_path / "p.csv"), "--no-progress"]
    assert main(args + ["--prior", "uniform"]) == 0
    assert "trained with re-balancing (loss class_balanced)" in capsys.readouterr().err
    assert main(args + ["--prior", "train"]) == 0 and "re-balancing" not in capsys.readouterr().err
    assert main(args) == 0 and "longtail: note" not in capsys.readouterr().err  # auto: no second adjustment


def test_prior_auto_adjusts_a_plain_ce_run_and_leaves_a_rebalanced_one(run, image_folder, tmp_path, capsys):
    """auto = uniform for plain CE with instance sampling, = train (no adjustment) for a re-balanced run;
    the command prints which, and why, in one line; longtail.load(...).predict does the same."""
    image = str(image_folder / "img0.png")
    copy = _rebalanced_copy(run, tmp_path)

    def csv_of(run_dir, *extra):
        out = tmp_path / "p.csv"
        assert main(["predict", str(run_dir), image, "--out", str(out), "--no-progress", *extra]) == 0
        return _read_csv(out), capsys.readouterr().out

    auto, printed = csv_of(run)
    assert auto == csv_of(run, "--prior", "uniform")[0] and auto != csv_of(run, "--prior", "train")[0]
    line = next(x for x in printed.splitlines() if x.startswith("prior "))
    assert line.startswith("prior uniform (auto): the run was trained toward its training prior (loss ce, "
                           "instance sampling")
    assert "; prior uniform, tau 1" in printed
    auto, printed = csv_of(copy)
    assert auto == csv_of(copy, "--prior", "train")[0] and auto != csv_of(copy, "--prior", "uniform")[0]
    line = next(x for x in printed.splitlines() if x.startswith("prior "))
    assert line.startswith("prior train (auto): the run was trained with re-balancing (loss class_balanced)")
    assert "; prior train, tau 1" in printed
    assert "(auto)" not in csv_of(copy, "--prior", "uniform")[1]  # an explicit prior is used as given

    images = [image]
    ce, cb = longtail.load(run, device="cpu"), longtail.load(copy, device="cpu")
    assert ce.choose_prior()[0] == "uniform" and cb.choose_prior()[0] == "train"
    assert np.array_equal(ce.predict(images).probs, ce.predict(images, prior="uniform").probs)
    assert np.array_equal(cb.predict(images).probs, cb.predict(images, prior="train").probs)
    assert not np.allclose(cb.predict(images).probs, cb.predict(images, prior="uniform").probs)


def test_load_and_predict_in_a_fresh_process(run, predictor, image_folder):
    files = [str(image_folder / "img0.png"), str(image_folder / "sub" / "img1.png"), str(image_folder / "big.png")]
    code = (
        "import json, sys, longtail\n"
        f"p = longtail.load({str(run)!r}, device='cpu')\n"
        f"pred = p.predict({files!r}, k=3)\n"
        "print(json.dumps({'classes': pred.top_classes, 'logits': pred.logits.tolist()}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    here = predictor.predict(files, k=3)
    assert got["classes"] == here.top_classes
    np.testing.assert_allclose(np.array(got["logits"]), here.logits, atol=1e-5, rtol=0)


def test_load_a_run_whose_method_replaces_the_head(run, tmp_path, test_images):
    from longtail.registry import METHODS

    if "ncm" not in METHODS:
        pytest.skip("needs the decoupled methods (ncm)")
    cfg = tiny_config(**{"method.name": "ncm", "method.params": {"stage1": str(run / "checkpoints" / "last.pt")}})
    train_run(config_from_dict(cfg), tmp_path / "ncm", arrays=tiny_arrays())
    predictor = longtail.load(tmp_path / "ncm", device="cpu")
    assert type(predictor.model.head).__name__ == "NCMHead"
    stored = np.load(tmp_path / "ncm" / "predictions.npz")["logits"]
    np.testing.assert_allclose(predictor.logits(test_images[0]).numpy(), stored, atol=1e-5, rtol=0)


def test_a_stated_prior_on_balanced_logits_adds_its_log_only_once():
    """Balanced softmax and LADE train z + log n, so their raw logits already aim at a uniform prior:
    adjusting toward a stated prior p_t starts from uniform (z + log p_t + const), not from the
    training prior (which would subtract log pi_train a second time); the logit-adjusted loss
    with tau trains z toward pi^(1 - tau)."""
    from conftest import tiny_config
    from longtail.config import config_from_dict
    from longtail.logit_adjust import source_prior, train_prior

    counts = np.array([40, 20, 10, 5])
    half = np.sqrt(counts) / np.sqrt(counts).sum()
    for loss, params, expected in (("balanced_softmax", {}, np.full(4, 0.25)), ("lade", {}, np.full(4, 0.25)),
                                   ("ce", {}, train_prior(counts)), ("logit_adjustment", {}, np.full(4, 0.25)),
                                   ("logit_adjustment", {"tau": 0.5}, half),
                                   ("logit_adjustment", {"tau": 0.0}, train_prior(counts))):
        cfg = config_from_dict(tiny_config(**{"loss.name": loss, "loss.params": params}))
        np.testing.assert_allclose(source_prior(cfg, counts), expected, err_msg=f"{loss} {params}")
