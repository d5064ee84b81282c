"""benchmarks/method_costs.py: parameter and FLOP counts of a few configs against the values the
docs state (docs/speed.md, docs/methods.md). Counts only; nothing is timed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import benchmark_script

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "cifar10_lt"


def _script():
    return benchmark_script("method_costs")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    mc = _script()
    names = ["ce", "bbn", "ride", "crt"]
    rows, skipped, made = mc.measure_all([CONFIGS / f"{n}.yaml" for n in names], batch=8,
                                         workdir=tmp_path_factory.mktemp("costs"))
    return mc, {Path(r["config"]).stem: r for r in rows}, skipped, made


def test_ce_resnet32(measured):
    _, rows, skipped, _ = measured
    assert skipped == []
    ce = rows["ce"]
    assert ce["trained_params"] == ce["all_params"] == 464_154
    # docs/speed.md: 412,290,816 FLOPs per training image, 137.7 M per inference forward
    assert ce["train_flops"] == pytest.approx(412_290_816, rel=1e-9)
    assert ce["inference_flops"] == pytest.approx(137.7e6, rel=5e-4)
    assert ce["step_fixed_flops"] == pytest.approx(0, abs=1)
    assert "last" in ce["phase"]


def test_bbn_and_ride(measured):
    _, rows, _, _ = measured
    bbn, ride = rows["bbn"], rows["ride"]
    assert bbn["trained_params"] == bbn["all_params"] == 538_778  # docs/methods.md, BBN
    assert bbn["inference_flops"] == pytest.approx(147.2e6, rel=5e-4)
    # docs/methods.md, RIDE: 770,896 parameters, 601.2 M training, 200.7 M inference FLOPs per image
    assert ride["trained_params"] == ride["all_params"] == 770_896
    assert ride["train_flops"] == pytest.approx(601.2e6, rel=5e-4)
    assert ride["inference_flops"] == pytest.approx(200.7e6, rel=5e-4)


def test_stage2_crt_on_a_stand_in_stage1(measured):
    _, rows, _, made = measured
    crt = rows["crt"]
    assert "cifar10_lt_ce" in made  # its stage 1, made by the script
    assert crt["trained_params"] == 650  # the re-initialised 64 x 10 linear head
    assert crt["all_params"] == 464_154
    # frozen backbone: its forward, the head's forward and weight gradient, no backbone backward
    assert crt["train_flops"] == pytest.approx(137.7e6 + 2 * 640, rel=5e-4)
    assert crt["inference_flops"] == pytest.approx(137.7e6, rel=5e-4)


def test_table_json_and_skip(measured, tmp_path, capsys):
    mc, rows, _, _ = measured
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: " + str(CONFIGS / "base.yaml") + "\nmethod:\n  name: no_such_method\n")
    out = tmp_path / "costs.json"
    assert mc.main(["--configs", str(CONFIGS / "ce.yaml"), str(bad), "--batch", "4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| standard | ce.yaml | 464,154 | 464,154 | 412.3 | 1.00 | 137.7 |" in text
    assert "| - | bad.yaml |" in text and "skipped" in text and "torch" in text
    saved = json.loads(out.read_text())
    assert [r["method"] for r in saved["rows"]] == ["standard"] and len(saved["skipped"]) == 1
    assert "x CE" in mc.table(list(rows.values()), [])
