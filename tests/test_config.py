import os
from pathlib import Path

import pytest

from longtail.config import apply_overrides, config_from_dict, load_config
from longtail.errors import ConfigError


def test_defaults_are_the_ldam_recipe():
    cfg = config_from_dict({})
    t = cfg.train
    assert (t.lr, t.momentum, t.weight_decay, t.batch_size, t.epochs) == (0.1, 0.9, 2e-4, 128, 200)
    assert (t.warmup_epochs, t.milestones, t.lr_decay) == (5, [160, 180], 0.01)
    assert cfg.model.name == "resnet32" and cfg.loss.name == "ce"


def test_unknown_key_is_named_with_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr' \(did you mean 'lr'\?\)"):
        config_from_dict({"train": {"lrr": 0.1}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="'train.epochs' must be int, got str"):
        config_from_dict({"train": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match="'train.lr' must be float, got bool"):
        config_from_dict({"train": {"lr": True}})


def test_int_accepted_for_float():
    assert config_from_dict({"train": {"lr": 1}}).train.lr == 1.0


@pytest.mark.parametrize("ratio", [0.5, -1, 0.999])
def test_imbalance_ratio_below_one(ratio):
    with pytest.raises(ConfigError, match="data.imbalance_ratio' must be a number >= 1"):
        config_from_dict({"data": {"imbalance_ratio": ratio}})


def test_overrides_parse_yaml_values():
    values = apply_overrides({}, ["train.lr=0.05", "train.milestones=[3, 4]", "data.root=null", "loss.params.beta=0.9"])
    assert values == {"train": {"lr": 0.05, "milestones": [3, 4]}, "data": {"root": None},
                      "loss": {"params": {"beta": 0.9}}}


def test_bad_override():
    with pytest.raises(ConfigError, match="must look like"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"train": {"lr": 1}}, ["train.lr.x=2"])


def test_load_config_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 3\n")
    assert load_config(p, ["train.batch_size=7"]).train.batch_size == 7
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    p.write_text("train: {epochs: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_unknown_choice_suggests():
    with pytest.raises(ConfigError, match="did you mean 'cosine'"):
        config_from_dict({"train": {"lr_schedule": "cosin"}})



def test_unknown_data_source_is_refused_where_the_data_is_built():
    # config.py (ground floor) cannot know the registered sources: the data build checks the name,
    # with the config-key message, before anything is read
    from longtail.data import build_data

    cfg = config_from_dict({"data": {"source": "cifar1000"}})
    message = (r"^config key 'data.source' must be one of arrays, cifar10, cifar100, digits, idx, imagefolder, "
               r"split_list, got 'cifar1000' \(did you mean 'cifar100'\?\)$")
    with pytest.raises(ConfigError, match=message):
        build_data(cfg.data)


def test_exponent_floats_that_yaml_reads_as_strings():
    # PyYAML reads 1e-3 (no dot) as a string; where a float is expected it is converted
    assert config_from_dict({"train": {"lr": "1e-3"}}).train.lr == 0.001
    assert load_config(None, ["train.weight_decay=5e-4"]).train.weight_decay == 0.0005
    with pytest.raises(ConfigError, match="must be float, got str"):
        config_from_dict({"train": {"lr": "fast"}})


# ----------------------------------------------------------------------------- paths

PATH_VALUES = {"data": {"source": "split_list", "root": "images", "cache_dir": "cache", "train_list": "lists/train.txt",
                        "val_list": "lists/val.txt", "test_list": "../test.txt"},
               "model": {"weights": "w/init.pt"},
               "method": {"name": "crt", "params": {"stage1": "runs/ce/checkpoints/last.pt", "similarity_run": "sim",
                                                          "teacher": "runs/ride6"}}}


def _paths(cfg) -> dict:
    d = cfg.data
    return {"root": d.root, "cache_dir": d.cache_dir, "train_list": d.train_list, "val_list": d.val_list,
            "test_list": d.test_list, "weights": cfg.model.weights, **cfg.method.params}


def test_relative_paths_in_a_config_file_are_relative_to_its_folder(tmp_path, monkeypatch):
    import yaml

    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    (folder / "c.yaml").write_text(yaml.safe_dump(PATH_VALUES))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config("../project/configs/c.yaml", ["data.val_list=mine/val.txt", "model.weights=/abs/w.pt"])
    assert _paths(cfg) == {"root": str(folder / "images"), "cache_dir": str(folder / "cache"),
                           "train_list": str(folder / "lists/train.txt"), "val_list": str(elsewhere / "mine/val.txt"),
                           "test_list": str(tmp_path / "project/test.txt"), "weights": "/abs/w.pt",
                           "stage1": str(folder / "runs/ce/checkpoints/last.pt"), "similarity_run": str(folder / "sim"),
                           "teacher": str(folder / "runs/ride6")}
    monkeypatch.chdir(tmp_path)  # the same file from another folder: the same paths
    assert _paths(load_config(folder / "c.yaml", ["data.val_list=mine/val.txt"]))["root"] == str(folder / "images")


def test_a_dictionary_and_a_legacy_run_config_are_relative_to_the_current_folder(tmp_path, monkeypatch):
    import yaml

    from longtail.runs import load_run_config

    monkeypatch.chdir(tmp_path)
    assert config_from_dict({"data": {"root": "~/x", "cache_dir": ""}}).data.root == os.path.expanduser("~/x")
    cfg = config_from_dict(PATH_VALUES)
    assert cfg.data.root == str(tmp_path / "images") and cfg.data.cache_dir == str(tmp_path / "cache")
    run = tmp_path / "sub" / "run"  # a config.yaml written before paths were stored absolute
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(PATH_VALUES))
    assert load_run_config("sub/run").data.root == str(tmp_path / "images")
    assert load_run_config("sub/run").method.params["stage1"] == str(tmp_path / "runs/ce/checkpoints/last.pt")


def test_shipped_configs_resolve_the_same_from_any_folder(tmp_path, monkeypatch):
    from conftest import REPO

    expected = {"ce": (str(REPO.parent / "shared/data/cifar10-jpeg.tar.gz"), None),
                "crt": (str(REPO.parent / "shared/data/cifar10-jpeg.tar.gz"),
                        str(REPO / "runs/bench/cifar10_lt_ce/checkpoints/last.pt"))}
    for cwd in (REPO, tmp_path, Path("/")):
        monkeypatch.chdir(cwd)
        for name, (root, stage1) in expected.items():
            cfg = load_config(REPO / "configs/cifar10_lt" / f"{name}.yaml")
            assert (cfg.data.root, cfg.method.params.get("stage1")) == (root, stage1), (cwd, name)
    monkeypatch.chdir(REPO)
    cfg = load_config("configs/cifar100_lt/ce.yaml")  # the shipped form: `longtail train configs/...` from the repo
    assert cfg.data.root == str(REPO.parent / "shared/data/cifar-100-python")
    for path in sorted((REPO / "configs").glob("cifar*/*.yaml")):
        raw = yaml_load(path)
        for value in (raw.get("data", {}).get("root"), raw.get("model", {}).get("weights"),
                      raw.get("method", {}).get("params", {}).get("stage1")):
            assert value is None or value.startswith(("../../../shared/", "../../runs/")), (path, value)


def yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _image_folder(root):
    import numpy as np
    from PIL import Image

    for split, n in (("train", 10), ("test", 3)):
        for c in range(3):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8, 3), 40 * c + i, dtype=np.uint8)).save(d / f"{i}.png")


def test_train_from_another_folder_then_eval_from_a_third(tmp_path, monkeypatch, capsys):
    """data.root and data.cache_dir relative to the config file; --out relative to the current folder;
    the run folder stores absolute paths, so `longtail eval` works from its parent."""
    import json

    import yaml

    from longtail.cli import main

    project = tmp_path / "project"
    _image_folder(project / "data")
    (project / "cfg.yaml").write_text(yaml.safe_dump({
        "data": {"source": "imagefolder", "root": "data", "cache_dir": "cache", "imbalance_ratio": 2},
        "model": {"name": "small_cnn", "params": {"width": 4}},
        "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0, "milestones": [], "progress": False}}))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["train", "../project/cfg.yaml", "--out", "runs/r"]) == 0
    saved = yaml.safe_load((work / "runs/r/config.yaml").read_text())["data"]
    assert (saved["root"], saved["cache_dir"]) == (str(project / "data"), str(project / "cache"))
    assert any((project / "cache").iterdir())
    first = json.loads((work / "runs/r/eval.json").read_text())
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "work/runs/r"]) == 0
    assert json.loads((work / "runs/r/eval.json").read_text())["top1"] == first["top1"]
    monkeypatch.chdir(work / "runs")
    assert main(["train", "--resume", "--out", "r"]) == 0  # finished: evaluates again, from here too
    capsys.readouterr()


def test_grid_method_config_paths_are_relative_to_that_config(tmp_path, monkeypatch):
    import yaml

    from longtail.bench import load_grid

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/m.yaml").write_text(yaml.safe_dump({"data": {"source": "digits", "cache_dir": "c"}}))
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({"base": "configs/m.yaml", "out": "out",
                                                        "imbalance_ratios": [10], "seeds": [0],
                                                        "methods": [{"name": "ce"}]}))
    monkeypatch.chdir(tmp_path)  # the grid file's own paths: relative to where bench runs
    cell = load_grid("grid.yaml", overrides=["model.weights=w.pt"]).cells[0]
    assert cell.cfg.data.cache_dir == str(tmp_path / "configs/c") and cell.cfg.model.weights == str(tmp_path / "w.pt")


# ----------------------------------------------------------------------------- inheritance (base:)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_chain_of_three_bases_merges_in_order(tmp_path):
    _write(tmp_path / "c.yaml", "train: {epochs: 3, lr: 0.5, milestones: [1, 2]}\n"
                                "loss: {name: focal, params: {gamma: 2.0}}\n")
    _write(tmp_path / "sub/b.yaml", "base: ../c.yaml\ntrain: {epochs: 4}\nloss: {params: {gamma: 1.0}}\n")
    a = _write(tmp_path / "sub/a.yaml", "base: b.yaml\ntrain: {lr: 0.2, milestones: [2]}\n")
    cfg = load_config(a)
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.batch_size) == (4, 0.2, 128)  # b over c, a over b, default
    assert cfg.train.milestones == [2]  # lists are replaced, not merged
    assert (cfg.loss.name, cfg.loss.params) == ("focal", {"gamma": 1.0})  # mappings merge key by key
    assert "base" not in cfg.to_dict()


def test_a_list_of_bases_merges_in_order(tmp_path):
    _write(tmp_path / "x.yaml", "train: {epochs: 5, lr: 0.3}\nmodel: {head: cosine}\n")
    _write(tmp_path / "y.yaml", "train: {epochs: 6}\n")
    child = _write(tmp_path / "child.yaml", "base: [x.yaml, y.yaml]\ntrain: {batch_size: 7}\n")
    cfg = load_config(child)
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.batch_size, cfg.model.head) == (6, 0.3, 7, "cosine")
    _write(tmp_path / "child.yaml", "base: [y.yaml, x.yaml]\n")
    assert load_config(child).train.epochs == 5  # the later base wins


def test_paths_in_a_base_are_relative_to_the_base_and_the_childs_to_the_child(tmp_path, monkeypatch):
    _write(tmp_path / "shared/base.yaml", "data: {source: split_list, root: images, train_list: lists/train.txt}\n"
                                          "model: {weights: w/init.pt}\n")
    child = _write(tmp_path / "exp/one/child.yaml", "base: ../../shared/base.yaml\ndata: {train_list: my.txt}\n"
                                                    "method: {name: crt, params: {stage1: ../runs/ce.pt}}\n")
    monkeypatch.chdir(tmp_path / "exp")  # the current folder plays no part
    cfg = load_config(child, ["data.val_list=v.txt"])
    assert cfg.data.root == str(tmp_path / "shared/images")
    assert cfg.model.weights == str(tmp_path / "shared/w/init.pt")
    assert cfg.data.train_list == str(tmp_path / "exp/one/my.txt")
    assert cfg.method.params["stage1"] == str(tmp_path / "exp/runs/ce.pt")
    assert cfg.data.val_list == str(tmp_path / "exp/v.txt")  # an override: relative to the current folder


def test_overrides_come_last(tmp_path):
    _write(tmp_path / "base.yaml", "train: {epochs: 3}\n")
    child = _write(tmp_path / "child.yaml", "base: base.yaml\ntrain: {epochs: 4}\n")
    assert load_config(child).train.epochs == 4
    assert load_config(child, ["train.epochs=5"]).train.epochs == 5


def test_an_empty_section_keeps_the_base_section(tmp_path):
    _write(tmp_path / "base.yaml", "train: {epochs: 3}\n")
    child = _write(tmp_path / "child.yaml", "base: base.yaml\ntrain:\n#  epochs: 9\n")
    assert load_config(child).train.epochs == 3


def test_a_cycle_of_bases_is_one_line_naming_the_files(tmp_path):
    tmp_path = tmp_path.resolve()  # the message names the files by their real paths
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    _write(a, "base: b.yaml\n")
    _write(b, "base: a.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(a)
    message = str(err.value)
    assert message == f"config files name each other as base in a cycle: {a} -> {b} -> {a}"
    _write(a, "base: a.yaml\n")
    with pytest.raises(ConfigError, match=f"in a cycle: {a} -> {a}$"):
        load_config(a)


def test_a_diamond_of_bases_is_no_cycle(tmp_path):
    _write(tmp_path / "root.yaml", "train: {epochs: 3}\n")
    _write(tmp_path / "l.yaml", "base: root.yaml\ntrain: {lr: 0.3}\n")
    _write(tmp_path / "r.yaml", "base: root.yaml\ntrain: {batch_size: 9}\n")
    cfg = load_config(_write(tmp_path / "top.yaml", "base: [l.yaml, r.yaml]\n"))
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.batch_size) == (3, 0.3, 9)


def test_a_missing_or_malformed_base_is_named(tmp_path):
    tmp_path = tmp_path.resolve()
    child = _write(tmp_path / "child.yaml", "base: nope.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    assert str(err.value) == f"base config not found: {tmp_path / 'nope.yaml'} (named by 'base' in {child})"
    _write(child, "base: [base.yaml, 3]\n")
    with pytest.raises(ConfigError, match="config key 'base' in .*child.yaml must be a config file path or a list"):
        load_config(child)
    _write(tmp_path / "bad.yaml", "- a list\n")
    _write(child, "base: bad.yaml\n")
    with pytest.raises(ConfigError, match="bad.yaml must hold a mapping"):
        load_config(child)


def test_base_is_a_file_key_only():
    # the resolved config (a run's config.yaml, a dictionary given in Python) has no `base`
    with pytest.raises(ConfigError, match="unknown config key 'base'"):
        config_from_dict({"base": "ce.yaml"})


def test_validate_prints_the_resolved_config(tmp_path, capsys):
    import yaml

    from longtail.cli import main

    _write(tmp_path / "base.yaml", "data: {source: digits}\ntrain: {epochs: 3}\n")
    child = _write(tmp_path / "child.yaml", "base: base.yaml\nloss: {name: focal}\n")
    assert main(["validate", str(child), "train.lr=0.5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "base" not in printed
    assert (printed["data"]["source"], printed["train"]["epochs"], printed["train"]["lr"], printed["loss"]["name"]) \
        == ("digits", 3, 0.5, "focal")
    assert main(["validate", str(child), "data.source=digit"]) == 2  # the source is checked too
    assert "got 'digit' (did you mean 'digits'?)" in capsys.readouterr().err


def test_every_shipped_config_loads_and_a_method_config_names_its_base():
    from conftest import REPO

    for folder in ("cifar10_lt", "cifar100_lt", "cifar10_lt_full"):
        paths = sorted((REPO / "configs" / folder).glob("*.yaml"))
        assert (REPO / "configs" / folder / "base.yaml") in paths and len(paths) > 30
        for path in paths:
            assert "base" not in load_config(path).to_dict(), path
            raw = yaml_load(path)
            if path.name != "base.yaml":
                assert raw.get("base") == "base.yaml", path
                # every config of a folder reads the same data; an LFME expert only cuts it to its classes
                assert set(raw.get("data") or {}) <= {"class_subset"}, path
