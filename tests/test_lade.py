"""LADE loss (Hong et al., CVPR 2021): values against the official formula, gradients, training,
resume, and its post-compensated inference through `longtail predict` / `longtail eval`."""

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from conftest import full_and_resumed, tiny_arrays, tiny_config
from longtail.cli import main
from longtail.config import config_from_dict
from longtail.errors import ConfigError
from longtail.losses import build_loss
from longtail.registry import LOSSES
from longtail.runs import train_run

COUNTS = [50, 20, 5]


def _batch(seed=0, dtype=torch.float32, B=6, C=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, generator=g, dtype=dtype), torch.tensor([0, 1, 2, 2, 1, 0][:B])


def _official(logits, target, counts, alpha, lam):
    """The official PriorCELoss + alpha * LADELoss, restated class by class in float64."""
    z = logits.double()
    n = torch.tensor(counts, dtype=torch.float64)
    prior = n / n.sum()
    C, B = len(counts), z.shape[0]
    ce = F.cross_entropy(z + torch.log(prior + 1e-9), target)
    total = torch.zeros((), dtype=torch.float64)
    for c in range(C):
        mine = target == c
        first = z[mine, c].sum() / (mine.sum() + 1e-8)
        q = z[:, c] - torch.log(prior[c] + 1e-9) + math.log(1.0 / C + 1e-9)
        second = torch.logsumexp(q, 0) - math.log(B)
        total = total + prior[c] * (first - second - lam * second ** 2)
    return ce - alpha * total


def test_equals_the_official_formula_including_a_class_absent_from_the_batch():
    logits, _ = _batch(B=6, C=4)
    target = torch.tensor([0, 1, 1, 0, 2, 0])  # class 3 is not in the batch (T1 = 0, T2 still counts)
    counts = [40, 20, 8, 2]
    for alpha, lam in ((0.1, 0.01), (0.5, 0.1), (1.0, 0.0), (0.0, 0.3)):
        loss = build_loss("lade", {"alpha": alpha, "remine_lambda": lam}, class_counts=counts)
        assert torch.allclose(loss(logits, target).double(), _official(logits, target, counts, alpha, lam),
                              atol=1e-6), (alpha, lam)


def test_hand_computed_two_classes():
    # counts [3, 1]: pi = [0.75, 0.25]; z = [[1, 0], [0, 2]], y = [0, 1]; alpha 0.5, lambda 0.1
    lp = [math.log(0.75 + 1e-9), math.log(0.25 + 1e-9)]
    lu = math.log(0.5 + 1e-9)
    z = [[1.0, 0.0], [0.0, 2.0]]

    def ce(row, y):
        a = [row[j] + lp[j] for j in range(2)]
        return -(a[y] - math.log(math.exp(a[0]) + math.exp(a[1])))

    lade_ce = (ce(z[0], 0) + ce(z[1], 1)) / 2
    t1 = [1.0 / (1 + 1e-8), 2.0 / (1 + 1e-8)]
    t2 = [math.log(sum(math.exp(z[i][c] - lp[c] + lu) for i in range(2))) - math.log(2) for c in range(2)]
    lader = -sum(p * (t1[c] - t2[c] - 0.1 * t2[c] ** 2) for c, p in enumerate([0.75, 0.25]))
    loss = build_loss("lade", {"alpha": 0.5, "remine_lambda": 0.1}, class_counts=[3, 1])
    value = loss(torch.tensor(z), torch.tensor([0, 1]))
    assert value.item() == pytest.approx(lade_ce + 0.5 * lader, abs=1e-6)  # float32
    assert loss.lader(torch.tensor(z), torch.tensor([0, 1])).item() == pytest.approx(lader, rel=1e-6)


def test_neutral_setting_alpha_zero_with_equal_counts_is_cross_entropy():
    logits, target = _batch()
    ce = F.cross_entropy(logits, target)
    assert LOSSES.get("lade").neutral_params is None  # CE needs equal counts: a property of the data
    assert torch.allclose(build_loss("lade", {"alpha": 0.0}, class_counts=[7, 7, 7])(logits, target), ce, atol=1e-6)
    assert not torch.allclose(build_loss("lade", {"alpha": 0.1}, class_counts=[7, 7, 7])(logits, target), ce)
    # alpha 0 on a long tail is LADE-CE = PriorCELoss = balanced softmax (up to their eps)
    bs = build_loss("balanced_softmax", class_counts=COUNTS)(logits, target)
    assert torch.allclose(build_loss("lade", {"alpha": 0.0}, class_counts=COUNTS)(logits, target), bs, atol=1e-6)


def test_gradcheck_float64():
    logits, target = _batch(dtype=torch.float64)
    logits.requires_grad_(True)
    loss = build_loss("lade", {"alpha": 0.5, "remine_lambda": 0.1}, class_counts=COUNTS).double()
    assert torch.autograd.gradcheck(lambda z: loss(z, target), (logits,))
    loss.set_class_weight(torch.tensor([0.2, 0.8, 2.0]))
    assert torch.autograd.gradcheck(lambda z: loss(z, target), (logits,))


def test_class_weight_applies_to_the_lade_ce_term_only():
    logits, target = _batch()
    loss = build_loss("lade", class_counts=COUNTS)
    w = torch.tensor([0.2, 0.8, 2.0])
    loss.set_class_weight(w)
    prior = torch.tensor(COUNTS, dtype=torch.float32) / sum(COUNTS)
    per = F.cross_entropy(logits + torch.log(prior + 1e-9), target, reduction="none")
    expected = (per * w[target]).sum() / w[target].sum() + 0.1 * loss.lader(logits, target)
    assert torch.allclose(loss(logits, target), expected, atol=1e-6)


def test_low_precision_logits_are_computed_in_float32():
    logits, target = _batch()
    loss = build_loss("lade", class_counts=COUNTS)
    half = logits.to(torch.bfloat16)
    value = loss(half, target)
    assert value.dtype == torch.float32
    assert torch.allclose(value, loss(half.float(), target))


@pytest.mark.parametrize("params, message", [
    ({"alpha": -0.1}, "alpha must be a finite number >= 0"),
    ({"alpha": float("nan")}, "alpha must be a finite number >= 0"),
    ({"alpha": True}, "alpha must be a finite number >= 0"),
    ({"remine_lambda": -1}, "remine_lambda must be a finite number >= 0"),
    ({"remine_lambda": "0.1"}, "remine_lambda must be a finite number >= 0"),
])
def test_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        build_loss("lade", params, class_counts=COUNTS)


def test_bad_parameter_in_a_config_is_a_one_line_config_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="has no parameter 'lambda'"):
        build_loss("lade", {"lambda": 0.1}, class_counts=COUNTS)
    cfg = tmp_path / "lade.yaml"  # digits: no dataset outside the repo is needed
    cfg.write_text(yaml.safe_dump({"data": {"source": "digits", "imbalance_ratio": 10, "test_per_class": 10},
                                   "model": {"name": "small_cnn", "params": {"width": 4}},
                                   "loss": {"name": "lade", "params": {"alpha": 0.1}}}))
    assert main(["validate", str(cfg), "loss.params.alpha=-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longtail: error: ") and "alpha must be a finite number >= 0" in err
    assert err.count("\n") == 1


def test_trains_two_epochs_and_resumes_exactly(tmp_path, monkeypatch):
    from longtail.io import safe_torch_load

    cfg = tiny_config(**{"loss.name": "lade", "loss.params": {"alpha": 0.5, "remine_lambda": 0.1}})
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(),
                                    evaluate=False)
    a = safe_torch_load(full / "checkpoints/last.pt")
    b = safe_torch_load(cut / "checkpoints/last.pt")
    assert a["epoch"] == b["epoch"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    losses = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(v) for r in losses for k, v in r.items() if k == "train_loss")


# ----------------------------------------------------------------------------- inference


@pytest.fixture(scope="module")
def lade_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lade") / "run"
    cfg = tiny_config(**{"loss.name": "lade", "loss.params": {"alpha": 0.1, "remine_lambda": 0.01}})
    train_run(config_from_dict(cfg), out, arrays=tiny_arrays())
    return out


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_applies_the_official_post_compensation(lade_run, tmp_path, capsys):
    """Official LADE inference: softmax(z) for a uniform test prior, softmax(z + log p_t) for a
    stated p_t (run_networks.py eval; notebooks/*-shift-calib.ipynb get_prob). 'auto' is uniform."""
    import longtail
    from longtail.logit_adjust import train_prior

    images = tiny_arrays()["test_images"][::6][:4]
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(img).save(paths[-1])
    predictor = longtail.load(lade_run, device="cpu")
    raw = predictor.logits(images).double()
    p_t = np.array([1.0, 2.0, 4.0, 8.0]) / 15.0
    (tmp_path / "prior.txt").write_text("".join(f"{v}\n" for v in [1, 2, 4, 8]))
    pi_train = train_prior(predictor.class_counts)

    def cli(*extra):
        out = tmp_path / "p.csv"
        assert main(["predict", str(lade_run), *map(str, paths), "--out", str(out), "--k", "4", "--no-progress",
                     *extra]) == 0
        captured = capsys.readouterr()
        rows = _read_csv(out)
        probs = np.zeros((len(rows), 4))
        for r, row in enumerate(rows):
            for j in range(1, 5):
                probs[r, int(row[f"top{j}_class"])] = float(row[f"top{j}_prob"])
        return probs, captured

    expected = {
        "auto": torch.softmax(raw, 1).numpy(),
        "uniform": torch.softmax(raw, 1).numpy(),
        str(tmp_path / "prior.txt"): torch.softmax(raw + torch.log(torch.tensor(p_t)), 1).numpy(),
        "train": torch.softmax(raw + torch.log(torch.tensor(pi_train)), 1).numpy(),
    }
    for prior, want in expected.items():
        got, captured = cli("--prior", prior)
        np.testing.assert_allclose(got, want, atol=2e-4, err_msg=prior)
        assert "longtail: note" not in captured.err  # uniform does not adjust a LADE run twice
        api = predictor.predict(images, k=4, prior=prior)
        np.testing.assert_allclose(api.probs, want, atol=1e-5, err_msg=prior)
    _, captured = cli()
    line = next(x for x in captured.out.splitlines() if x.startswith("prior "))
    assert line.startswith("prior uniform (auto): the run's loss (lade) trains logits calibrated to a uniform prior")
    assert predictor.choose_prior("auto")[0] == "uniform"


def test_eval_logit_adjust_leaves_a_lade_run_as_it_is(lade_run, capsys):
    assert main(["eval", str(lade_run), "--logit-adjust-tau", "1"]) == 0
    capsys.readouterr()
    plain = json.loads((lade_run / "eval.json").read_text())
    adjusted = json.loads((lade_run / "eval_logit_adjusted.json").read_text())
    for key in ("top1", "many", "medium", "few", "mcc", "ece", "per_class"):
        if key in plain:
            assert adjusted[key] == pytest.approx(plain[key]), key
