"""Many classes: eval.json stays small, its arrays round-trip through RunDir, logits storage."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import sparse

from conftest import tiny_arrays, tiny_config
from longtail.errors import CheckpointError, ConfigError
from longtail.eval.metrics import compute_metrics, mcc_from_confusion, sparse_confusion, top_k_accuracy
from longtail.rundir import INLINE_MAX_CLASSES, RunDir


def _section(C: int, confusion) -> dict:
    return {"top1": 1.0, "per_class": [50.0, None] + [1.0] * (C - 2), "train_counts": list(range(C, 0, -1)),
            "groups": {"many": [0], "medium": [], "few": list(range(1, C))},
            "class_names": [f"c{i}" for i in range(C)], "confusion": confusion}


@pytest.mark.parametrize("dense", [True, False])
def test_eval_arrays_round_trip_dense_and_sparse(tmp_path, dense):
    C = INLINE_MAX_CLASSES + 20
    rs = np.random.RandomState(0)
    cm = rs.randint(1, 5, size=(C, C)) if dense else np.diag(np.arange(C)) + np.eye(C, k=1, dtype=int)
    run = RunDir(tmp_path)
    result = {**_section(C, sparse.csr_matrix(cm)), "best_val": {**_section(C, cm.tolist()), "epoch": 1}}
    run.write_eval(result)
    with np.load(tmp_path / RunDir.EVAL_ARRAYS[RunDir.EVAL]) as z:
        assert ("confusion/dense" in z.files) == dense and ("confusion/rows" in z.files) == (not dense)
    small = json.loads((tmp_path / RunDir.EVAL).read_text())
    assert "confusion" not in small and "per_class" not in small["best_val"] and small["top1"] == 1.0
    for section in (None, "best_val"):
        got = run.read_eval_arrays(section=section)
        assert (got["confusion"].toarray() == cm).all() and got["per_class"][:2] == [50.0, None]
        assert got["train_counts"] == list(range(C, 0, -1)) and got["groups"]["few"] == list(range(1, C))
        assert got["class_names"][-1] == f"c{C - 1}"
    assert (run.read_eval_full()["best_val"]["confusion"].toarray() == cm).all()


def test_old_style_eval_json_still_read(tmp_path):
    """Confusion and per-class lists inside eval.json (old runs, and runs of <= 100 classes)."""
    run = RunDir(tmp_path)
    run.write_json(RunDir.EVAL, _section(3, [[1, 0, 0], [0, 0, 1], [0, 0, 2]]))
    got = run.read_eval_arrays()
    assert got["confusion"].toarray().tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 2]]
    assert got["per_class"] == [50.0, None, 1.0]
    run.write_json(RunDir.EVAL, {"top1": 1.0, "arrays": "eval_arrays.npz"})
    with pytest.raises(CheckpointError, match="names eval_arrays.npz, which is missing"):
        run.read_eval_arrays()


def test_sparse_metrics_equal_sklearn():
    from sklearn.metrics import confusion_matrix, matthews_corrcoef

    rs = np.random.RandomState(1)
    logits = rs.randn(300, 150).astype(np.float32)
    labels = rs.randint(0, 150, 300)
    logits[:100, :] = 0.0  # ties: the lower class index wins
    preds = logits.argmax(1)
    cm = sparse_confusion(labels, preds, 150)
    assert (cm.toarray() == confusion_matrix(labels, preds, labels=np.arange(150))).all()
    assert mcc_from_confusion(cm) == pytest.approx(matthews_corrcoef(labels, preds), abs=1e-12)
    top = np.argsort(-logits.astype(np.float64), axis=1, kind="stable")[:, :5]
    assert top_k_accuracy(logits, labels, 5) == pytest.approx((top == labels[:, None]).any(1).mean() * 100)
    m = compute_metrics(logits, labels, np.full(150, 30))
    assert sparse.issparse(m["confusion"]) and m["mcc"] == pytest.approx(matthews_corrcoef(labels, preds))


def test_eval_json_small_at_2000_classes(tmp_path):
    """A tiny run with 2,000 classes (1 epoch): eval.json holds scalars only (was ~24 MB)."""
    from longtail.config import config_from_dict
    from longtail.runs import train_run

    arrays = tiny_arrays(num_classes=2000, per_class=2, test_per_class=1, size=4)
    cfg = tiny_config(**{"train.epochs": 1, "train.batch_size": 512, "train.eval_batch_size": 1000,
                         "train.milestones": [], "train.warmup_epochs": 0, "data.profile": "none"})
    result = train_run(config_from_dict(cfg), tmp_path / "run", arrays=arrays)
    run = RunDir(tmp_path / "run")
    assert (tmp_path / "run" / RunDir.EVAL).stat().st_size < 20_000
    got = run.read_eval_arrays()
    assert got["confusion"].shape == (2000, 2000) and got["confusion"].sum() == 2000
    assert got["per_class"] == result["per_class"]


@pytest.mark.parametrize("dtype", ["float16", "topk"])
def test_logits_storage(tmp_path, dtype):
    run = RunDir(tmp_path)
    logits = np.random.RandomState(0).randn(6, 12).astype(np.float32)
    run.write_predictions({"logits": logits, "labels": np.arange(6)}, dtype=dtype, topk=3)
    preds = run.read_predictions()
    if dtype == "float16":
        assert preds["logits"].dtype == np.float16
        np.testing.assert_allclose(run.read_logits(), logits, atol=1e-2)
        return
    assert (preds["logits_topk_indices"] == np.argsort(-logits, axis=1)[:, :3]).all()
    np.testing.assert_array_equal(preds["logits_topk_values"], -np.sort(-logits, axis=1)[:, :3])
    with pytest.raises(CheckpointError, match=r"^.*predictions.npz holds only the top-3 logits of each image "
                                              r"\(eval.logits_dtype=topk\); post-hoc logit adjustment needs full "
                                              r"logits: set eval.logits_dtype: float32 in .*config.yaml and rerun `longtail eval .*`$"):
        run.read_logits(what="post-hoc logit adjustment")


def test_logits_dtype_is_validated():
    from longtail.config import config_from_dict

    with pytest.raises(ConfigError, match="eval.logits_dtype' must be one of float32, float16, topk, got 'int8'"):
        config_from_dict(tiny_config(**{"eval.logits_dtype": "int8"}))


def test_top_k_indices_equal_the_stable_full_sort():
    """rundir.top_k_indices (argpartition) == argsort(-v, stable)[:, :k], ties to the lower class, NaN rows too."""
    from longtail.rundir import top_k_indices

    rs = np.random.RandomState(0)
    for dtype in (np.float32, np.float16):
        values = rs.randint(0, 4, size=(300, 40)).astype(dtype)  # many ties
        values[3, 5], values[4, :], values[5, :] = np.nan, np.nan, np.inf
        for k in (1, 2, 7, 40):
            assert (top_k_indices(values, k) == np.argsort(-values, axis=1, kind="stable")[:, :k]).all()
    with pytest.raises(ValueError, match="k must be in"):
        top_k_indices(values, 41)


# -- tools at 2,000 classes: tiny IDX data, one epoch, then similarity / doctor / report through the CLI
MANY = 2000


def _write_idx(path, array: np.ndarray) -> None:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


@pytest.fixture(scope="module")
def many_run(tmp_path_factory):
    """(config path, run folder) of a 2,000-class run: 2 or 3 training and 1 test 4x4 image per class."""
    import yaml

    from longtail.config import load_config
    from longtail.runs import train_run

    root = tmp_path_factory.mktemp("many")
    rs = np.random.RandomState(0)
    train = np.repeat(np.arange(MANY), np.where(np.arange(MANY) < MANY // 2, 3, 2))
    test = np.arange(MANY)
    for stem, labels in (("train", train), ("t10k", test)):
        images = np.clip((labels % 200)[:, None, None] + rs.randint(0, 40, (len(labels), 4, 4)), 0, 255)
        _write_idx(root / f"{stem}-images-idx3-ubyte", images.astype(np.uint8))
        _write_idx(root / f"{stem}-labels-idx1-ubyte", labels.astype(">i4"))
    cfg = tiny_config(**{"data.source": "idx", "data.root": str(root), "data.profile": "none",
                         "train.epochs": 1, "train.batch_size": 512, "train.eval_batch_size": 1000,
                         "train.milestones": [], "train.warmup_epochs": 0, "train.augment": {}})
    path = root / "many.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train_run(load_config(path), root / "run")
    return path, root / "run"


def test_similarity_at_2000_classes_writes_small_files(many_run, tmp_path, capsys):
    """Banded windows, no C x C similarity (was a ~60 MB similarity.json of 2,000^2 numbers, and exact
    t-SNE); the per-class arrays in similarity_arrays.npz."""
    from longtail.cli import main

    _, run = many_run
    out = tmp_path / "sim"
    assert main(["similarity", str(run), "--out", str(out), "--window", "5"]) == 0
    assert "more classes in classes.csv" in capsys.readouterr().out
    assert (out / "similarity.json").stat().st_size < 50_000
    assert (out / "similarity_arrays.npz").stat().st_size < 500_000
    small = json.loads((out / "similarity.json").read_text())
    assert small["arrays"] == "similarity_arrays.npz" and small["num_classes"] == MANY and "similarity" not in small
    with np.load(out / "similarity_arrays.npz") as z:
        assert z["window_members"].shape == (MANY, 5) and z["window_similarity"].shape == (MANY, 5)
        assert len(z["swr_weights"]) == MANY and np.isfinite(z["swm_margins"]).all()
        order, members = z["order"], z["window_members"]
        assert members[order[0]].tolist() == order[:5].tolist()  # 'shift': the first window starts the order
    assert len((out / "classes.csv").read_text().splitlines()) == MANY + 1


def test_doctor_at_2000_classes_never_builds_the_full_similarity(many_run, tmp_path, monkeypatch, capsys):
    """confusable_pairs takes head rows in blocks of PAIR_BLOCK (was one 2,000 x 2,000 matrix and its pairs)."""
    import sklearn.metrics.pairwise as pairwise

    from longtail.cli import main
    from longtail.doctor.confusable import PAIR_BLOCK

    real, shapes = pairwise.cosine_similarity, []

    def spy(a, b=None, **kw):
        out = real(a, b, **kw)
        shapes.append(out.shape)
        return out

    monkeypatch.setattr(pairwise, "cosine_similarity", spy)
    cfg, run = many_run
    out = tmp_path / "doc"
    assert main(["doctor", str(cfg), "--out", str(out), "--features", str(run), "--min-ratio", "1.5",
                 "--no-progress"]) == 0
    assert "confusable head-tail pairs" in capsys.readouterr().out
    assert shapes and max(s[0] for s in shapes) <= PAIR_BLOCK
    report = json.loads((out / "doctor.json").read_text())
    f = report["features"]
    assert f["num_pairs"] == (MANY // 2) ** 2 and len(f["pairs"]) == 10 and len(f["at_risk"]) == MANY // 2
    sims = [p["similarity"] for p in f["pairs"]]
    assert sims == sorted(sims, reverse=True)
    assert (out / "doctor.json").stat().st_size < 2_000_000


def test_report_at_2000_classes_bins_per_class_figures(many_run, tmp_path):
    from longtail.cli import main

    _, run = many_run
    out = tmp_path / "report.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    html = out.read_text()
    assert "classes head to tail in 50 equal bins" in html
    assert out.stat().st_size < 2_000_000


def test_ghm_cwap_state_has_no_class_by_class_buffer():
    """Margins M_{y_i, n} are built per batch (B, C) from S (C,); the state is (C, bins) at most."""
    import torch

    from longtail.losses.ghm_cwap import GHMCWAPLoss

    loss = GHMCWAPLoss(class_counts=np.full(MANY, 3), bins=4)
    target = torch.arange(64) * 31
    for epoch in range(2):
        loss.on_epoch_start(epoch)
        loss(torch.randn(64, MANY), target)
    assert loss.margins(target).shape == (64, MANY)
    assert max(t.numel() for t in loss.state_dict().values()) <= 2 * MANY * 4
