"""`longtail doctor` on fixtures with known counts, duplicates and broken files."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import longtail
from conftest import tiny_arrays, tiny_config
from longtail.cli import main
from longtail.config import config_from_dict
from longtail.data import build_data
from longtail.doctor import run_doctor
from longtail.doctor.confusable import first_per_tail, rank_pairs, sample_per_class
from longtail.similarity.projection import class_prototypes
from longtail.doctor.stats import effective_number
from longtail.errors import ConfigError, DataError
from longtail.losses import effective_number_weights
from longtail.runs import train_run

COUNTS = {"apple": 12, "bee": 6, "cat": 3}  # readable PNGs per class, before the extra files below


def _png(path, seed, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3)).astype(np.uint8)).save(path)


@pytest.fixture
def flat(tmp_path):
    """apple 12, bee 6 + a corrupt JPEG, cat 3 + a copy of apple/0.png; plus files training ignores."""
    root = tmp_path / "flat"
    seed = 0
    for name, n in COUNTS.items():
        for i in range(n):
            _png(root / name / f"{i}.png", seed)
            seed += 1
    (root / "bee" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    shutil.copy(root / "apple" / "0.png", root / "cat" / "copy.png")
    (root / "bee" / "readme.txt").write_text("ignored")
    _png(root / "loose.png", 100)  # not in a class folder
    _png(root / "cat" / "nested" / "deep.png", 101)  # training reads <class>/<image> only
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("doctor") / "run"
    train_run(config_from_dict(tiny_config(**{"train.epochs": 1})), out, arrays=tiny_arrays())
    return out


def test_folder_counts_statistics_duplicates_and_unreadable(flat, tmp_path):
    r = run_doctor(flat, out=tmp_path / "out", many_threshold=10, few_threshold=5)
    assert r["class_names"] == ["apple", "bee", "cat"] and r["counts"] == [12, 7, 4]
    assert r["num_images"] == 23 and r["imbalance_ratio"] == 3.0
    assert r["largest"] == {"class": "apple", "count": 12} and r["smallest"] == {"class": "cat", "count": 4}
    e12 = (1 - 0.999 ** 12) / (1 - 0.999)  # 11.934...
    assert e12 == pytest.approx(11.93422, abs=1e-5)
    assert r["effective_number"]["0.999"][0] == pytest.approx(e12, abs=1e-4)
    assert r["effective_imbalance_ratio"]["0.9999"] == pytest.approx((1 - 0.9999 ** 12) / (1 - 0.9999 ** 4))
    assert r["groups"] == {"many": ["apple"], "medium": ["bee"], "few": ["cat"]}
    assert r["group_sizes"] == {"many": 1, "medium": 1, "few": 1}
    assert r["unreadable"] == [{"path": "bee/broken.jpg", "split": "train", "class": "bee",
                                "error": r["unreadable"][0]["error"]}]
    assert r["unreadable"][0]["error"].startswith("cannot decode image bee/broken.jpg")
    assert len(r["duplicates"]) == 1
    dup = r["duplicates"][0]
    assert [i["path"] for i in dup["items"]] == ["apple/0.png", "cat/copy.png"]
    assert dup["cross_class"] and not dup["cross_split"]
    assert r["image_sizes"] == {"8x8": 22}
    assert any("not in a class folder" in n for n in r["notes"]) and any("sub-folders" in n for n in r["notes"])
    saved = json.loads((tmp_path / "out" / "doctor.json").read_text())
    assert saved == {k: v for k, v in json.loads(json.dumps(r)).items() if k != "report"}
    with Image.open(tmp_path / "out" / "class_counts.png") as fig:
        assert fig.format == "PNG" and fig.size[0] >= 600 and fig.size[1] >= 400


def test_imagefolder_layout_flags_train_test_leaks(tmp_path):
    root = tmp_path / "ds"
    for i in range(5):
        _png(root / "train" / "a" / f"{i}.png", i)
    _png(root / "train" / "b" / "0.png", 10, size=12)
    (root / "test" / "a").mkdir(parents=True)
    shutil.copy(root / "train" / "a" / "3.png", root / "test" / "a" / "3.png")  # a train image in the test set
    _png(root / "test" / "b" / "0.png", 11)
    _png(root / "test" / "zebra" / "0.png", 12)
    r = run_doctor(root, out=tmp_path / "out")
    assert r["counts"] == [5, 1] and r["imbalance_ratio"] == 5.0 and r["group_sizes"]["few"] == 2
    assert len(r["duplicates"]) == 1 and r["duplicates"][0]["cross_split"] and not r["duplicates"][0]["cross_class"]
    assert {i["split"] for i in r["duplicates"][0]["items"]} == {"train", "test"}
    assert any("test/zebra is not a training class" in n for n in r["notes"])
    assert any("2 different image sizes" in n for n in r["notes"]) and r["image_sizes"] == {"8x8": 7, "12x12": 1}


def test_config_spec_uses_build_data_counts(tmp_path):
    cfg = {"data": {"source": "digits", "imbalance_ratio": 10, "test_per_class": 20},
           "eval": {"many_threshold": 80, "few_threshold": 30}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = run_doctor(path, out=tmp_path / "out", overrides=["data.imbalance_ratio=50"])
    cfg["data"]["imbalance_ratio"] = 50
    data = build_data(config_from_dict(cfg).data)
    assert r["counts"] == data.class_counts.tolist() and r["counts"][-1] == 3 and r["counts"][0] == 158
    assert r["thresholds"] == {"many": 80, "few": 30}
    assert r["group_sizes"] == {"many": int((data.class_counts > 80).sum()), "few": int((data.class_counts < 30).sum()),
                                "medium": int(((data.class_counts >= 30) & (data.class_counts <= 80)).sum())}
    assert r["unreadable"] == [] and r["image_sizes"] == {"8x8": len(data.train) + len(data.test)}


def test_config_with_unreadable_files_reports_them_instead_of_stopping(flat, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(flat, root / "train")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"data": {"source": "imagefolder", "root": str(root), "profile": "none"}}))
    r = run_doctor(path, out=tmp_path / "out")
    assert [u["path"] for u in r["unreadable"]] == ["train/bee/broken.jpg"] and r["counts"] == [12, 7, 4]
    assert any("build_data would stop" in n for n in r["notes"])


def test_effective_number_matches_the_class_balanced_weights():
    counts = np.array([500, 120, 30, 7, 1])
    for beta in (0.999, 0.9999):
        inv = 1.0 / effective_number(counts, beta)
        torch.testing.assert_close(torch.tensor(inv / inv.sum() * len(counts), dtype=torch.float32),
                                   effective_number_weights(counts, beta))
    assert effective_number([0, 1], 0.9).tolist() == pytest.approx([0.0, 1.0])


def test_prototype_ranking_on_known_vectors():
    # class 3 (tail) points the way of class 0 (head); class 2 the way of class 1
    feats = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 1], [0.1, 1, 0], [1, 0.1, 0]], dtype=np.float64)
    labels = np.array([0, 0, 1, 1, 2, 3])
    protos, used = class_prototypes([(feats[:3], labels[:3]), (feats[3:], labels[3:])], 4)
    assert used.tolist() == [2, 2, 1, 1] and np.allclose(protos[1], [0, 1, 0.5])
    counts = [100, 50, 10, 5]
    head, tail, sim = rank_pairs(protos, counts, min_ratio=2.0)
    pairs = list(zip(head.tolist(), tail.tolist(), strict=True))
    assert set(pairs) == {(0, 2), (0, 3), (1, 2), (1, 3), (0, 1), (2, 3)}  # 0 vs 1: 100 >= 2 x 50
    assert pairs[0] == (0, 3) and sim[0] == pytest.approx(1 / np.sqrt(1.01))
    assert list(sim) == sorted(sim, reverse=True)
    assert [pairs[i][1] for i in first_per_tail(tail)] == [3, 2, 1]
    assert len(rank_pairs(protos, counts, min_ratio=20.0)[0]) == 1  # only 100 vs 5
    with pytest.raises(ConfigError, match="min_ratio must be >= 1"):
        rank_pairs(protos, counts, min_ratio=0.5)
    pos = sample_per_class(np.array([0] * 10 + [1] * 3), 2, 4)
    assert len(pos) == 7 and (pos[-3:] == [10, 11, 12]).all()


def test_features_rank_confusable_pairs_of_a_folder(flat, run, tmp_path):
    r = run_doctor(flat, out=tmp_path / "out", features=run, min_ratio=1.5, device="cpu")
    f = r["features"]
    assert f["images_used"] == [12, 6, 4]  # the corrupt file is skipped, the duplicate counts
    assert f["num_pairs"] == 3
    assert {(p["head"], p["tail"]) for p in f["pairs"]} == {("apple", "bee"), ("apple", "cat"), ("bee", "cat")}
    sims = [p["similarity"] for p in f["pairs"]]
    assert sims == sorted(sims, reverse=True) and all(-1 <= s <= 1 for s in sims)
    predictor = longtail.load(run, device="cpu")
    proto = {c: predictor.features(sorted(p for p in (flat / c).glob("*.png"))).double().mean(0)
             for c in ("apple", "bee", "cat")}
    for p in f["pairs"]:
        expected = torch.nn.functional.cosine_similarity(proto[p["head"]], proto[p["tail"]], dim=0).item()
        assert p["similarity"] == pytest.approx(expected, abs=1e-5)
    assert {p["tail"] for p in f["at_risk"]} == {"bee", "cat"}


def test_doctor_cli(flat, run, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["doctor", str(flat), "--out", str(out), "--many-threshold", "10", "--few-threshold", "5",
                 "--features", str(run), "--min-ratio", "1.5", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "classes 3, training images 23" in text and "imbalance ratio 3.0" in text
    assert "many / medium / few (n > 10 / 5..10 / n < 5): 1 / 1 / 1" in text
    assert "apple/0.png (apple) = cat/copy.png (cat)  [different classes]" in text
    assert "bee/broken.jpg: cannot decode image" in text and "confusable head-tail pairs" in text
    assert (out / "doctor.json").is_file() and (out / "class_counts.png").is_file()
    for args, message in (([str(tmp_path / "nowhere")], "data spec not found"),
                          ([str(flat), "data.seed=1"], "overrides (section.key=value) apply to a config file"),
                          ([str(flat), "--features", str(tmp_path / "norun")], "run folder not found"),
                          ([str(tmp_path / "empty")], "no class folders in"),
                          ([str(flat), "--min-ratio", "0.5"], "min_ratio must be >= 1"),
                          ([str(flat), "--top", "0"], "top must be an integer >= 1")):
        (tmp_path / "empty").mkdir(exist_ok=True)
        assert main(["doctor", *args, "--out", str(tmp_path / "x"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("longtail: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
    with pytest.raises(DataError, match="is an archive"):
        (tmp_path / "d.tar.gz").write_bytes(b"")
        run_doctor(tmp_path / "d.tar.gz", out=tmp_path / "y")


def test_class_with_training_but_no_test_images_is_flagged(tmp_path):
    root = tmp_path / "ds"
    for name, (n_train, n_test) in {"a": (4, 2), "b": (3, 0), "c": (2, 1)}.items():
        for i in range(n_train):
            _png(root / "train" / name / f"{i}.png", 10 * i + n_train)
        for i in range(n_test):
            _png(root / "test" / name / f"{i}.png", 100 + 10 * i + n_test)
    r = run_doctor(root, out=tmp_path / "out")
    assert r["no_test_images"] == ["b"]
    note = [n for n in r["notes"] if "no test images" in n]
    assert note == ["class 'b' has training images but no test images: its test accuracy will be undefined "
                    "(null in eval.json) and left out of the mean and shot-group accuracies"]
    from longtail.doctor.report import format_report

    assert f"note: {note[0]}" in format_report(r)
    path = tmp_path / "cfg.yaml"  # the same folder as a config: build_data's test split
    path.write_text(yaml.safe_dump({"data": {"source": "imagefolder", "root": str(root), "profile": "none",
                                             "cache_dir": str(tmp_path / "cache")}}))
    assert run_doctor(path, out=tmp_path / "out2")["no_test_images"] == ["b"]
    shutil.rmtree(root / "test")  # no test split at all: training holds one out, nothing to flag
    assert run_doctor(root, out=tmp_path / "out3")["no_test_images"] == []
