"""GHM-CWAP (seed paper 003): histograms, Eq. 1 weights, Eq. 2 margins, AURA, epochs, resume, DDP."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from longtail.losses import build_loss
from longtail.losses import ghm_cwap as mod
from longtail.dist import DistContext


def two_class_logits(g, target):
    """float64 logits of two classes whose CE gradient norm 1 - p_y is exactly g (up to rounding)."""
    z = torch.zeros(len(g), 2, dtype=torch.float64)
    for i, (gi, yi) in enumerate(zip(g, target)):
        z[i, yi] = math.log((1 - gi) / gi)  # p_y = sigmoid(z_y - 0) = 1 - g
    return z, torch.tensor(target)


def ghm(params=None, counts=(9, 1)):
    base = {"bins": 4, "alpha": 0.5, "gamma": 0.8, "reduction": "mean"}
    return build_loss("ghm_cwap", {**base, **(params or {})}, class_counts=list(counts)).double()


# epoch 0 of the hand-worked example: bins 4 (edges 0, .25, .5, .75, 1), alpha 0.5
# class 0: g = 0.1 x4 (region 0), 0.3 x4 (region 1), 0.9 x1 (region 3) -> counts [4, 4, 0, 1]
# class 1: g = 0.6 x1 (region 2)                                       -> counts [0, 0, 1, 0]
EPOCH0 = ([0.1] * 4 + [0.3] * 4 + [0.9] + [0.6], [0] * 9 + [1])


def run_epoch0(loss):
    loss.on_epoch_start(0)
    z, t = two_class_logits(*EPOCH0)
    first = loss(z, t)
    loss.on_epoch_start(1)
    return first, z, t


def test_hand_worked_ura_histogram_weights_and_margins():
    loss = ghm({"approximation": "ura", "normalization": "none"})
    first, z, t = run_epoch0(loss)
    # no histogram in epoch 0: W = 1, M = 0, plain cross-entropy
    assert first.item() == pytest.approx(F.cross_entropy(z, t).item(), rel=1e-12)
    # S_0 = sqrt 4 + sqrt 4 + 0 + sqrt 1 = 5;  S_1 = sqrt 1 = 1
    assert loss.effective_size.tolist() == pytest.approx([5.0, 1.0])
    # W_0 = 5 / sqrt [4, 4, 1 (empty: one example), 1] = [2.5, 2.5, 5, 5];  W_1 = 1 / sqrt 1 = 1
    assert loss.region_weights.tolist() == [pytest.approx([2.5, 2.5, 5.0, 5.0]), pytest.approx([1.0] * 4)]
    # M_01 = 0.8 log min(1, 1/5) = -0.8 log 5;  M_10 = 0.8 log min(1, 5) = 0
    m = loss.margins(torch.tensor([0, 1]))
    assert m.tolist() == [pytest.approx([0.0, -0.8 * math.log(5)]), pytest.approx([0.0, 0.0])]
    assert loss.counts.sum() == 0  # reset for the new epoch
    # epoch 1: a class-0 example at g = 0.45 (region 1, W 2.5), one at g = 0.8 (region 3, W 5),
    # a class-1 example at g = 0.2 (W 1, no margin)
    z1, t1 = two_class_logits([0.45, 0.8, 0.2], [0, 0, 1])
    expect = (2.5 * F.cross_entropy(z1[0] + torch.tensor([0.0, -0.8 * math.log(5)], dtype=torch.float64), t1[0])
              + 5.0 * F.cross_entropy(z1[1] + torch.tensor([0.0, -0.8 * math.log(5)], dtype=torch.float64), t1[1])
              + 1.0 * F.cross_entropy(z1[2], t1[2])) / 3
    assert loss(z1, t1).item() == pytest.approx(expect.item(), rel=1e-12)


def test_class_normalization_and_weight_sum_reduction_by_hand():
    loss = ghm({"approximation": "ura", "normalization": "class"})
    run_epoch0(loss)
    # the histogram keeps Eq. 1's weights; class 0: 5 / sqrt [4, 4, 1 (empty), 1]
    assert loss.region_weights[0].tolist() == pytest.approx([2.5, 2.5, 5.0, 5.0])
    # batch 1: class 0 at regions 1 and 3 (Eq. 1: 2.5, 5), class 1 (Eq. 1: 1)
    # running class means after it: class 0 (2.5 + 5) / 2 = 3.75, class 1: 1
    z1, t1 = two_class_logits([0.45, 0.8, 0.2], [0, 0, 1])
    per = F.cross_entropy(z1 + loss.margins(t1), t1, reduction="none")
    w = [2.5 / 3.75, 5 / 3.75, 1.0]
    assert loss(z1, t1).item() == pytest.approx(((w[0] * per[0] + w[1] * per[1] + w[2] * per[2]) / 3).item(),
                                                rel=1e-12)
    assert loss.class_weight_sums.tolist() == [pytest.approx([7.5, 1.0]), pytest.approx([2.0, 1.0])]
    # batch 2: one class-0 example in region 0 (Eq. 1: 2.5): class 0's mean is now 10 / 3
    z2, t2 = two_class_logits([0.1], [0])
    per2 = F.cross_entropy(z2 + loss.margins(t2), t2, reduction="none")
    assert loss(z2, t2).item() == pytest.approx((2.5 / (10 / 3) * per2[0]).item(), rel=1e-12)
    # a new epoch starts its running sums again
    loss.on_epoch_start(2)
    assert loss.class_weight_sums.abs().sum() == 0
    # the default reduction divides by the batch's total weight instead of B
    summed = ghm({"approximation": "ura", "normalization": "none", "reduction": "weight_sum"})
    run_epoch0(summed)
    z3, t3 = two_class_logits([0.45, 0.2], [0, 1])
    per3 = F.cross_entropy(z3 + summed.margins(t3), t3, reduction="none")
    assert summed(z3, t3).item() == pytest.approx(((2.5 * per3[0] + per3[1]) / 3.5).item(), rel=1e-12)


def test_class_normalization_keeps_class_totals_when_examples_move():
    """The collapse of the histogram-epoch normalisation (docs/ghm_cwap.md): every example of a
    class sat in the last region, then most of them move into regions that were empty. Their
    Eq. 1 weights are large, but the class's total weight in the new epoch stays its count."""
    loss = ghm({"approximation": "ura", "alpha": 0.9, "gamma": 0.0, "normalization": "class"}, counts=(40, 40))
    loss.on_epoch_start(0)
    z, t = two_class_logits([0.95] * 40 + [0.5] * 40, [0] * 40 + [1] * 40)
    loss(z, t)
    loss.on_epoch_start(1)
    assert loss.region_weights[0, 0].item() == pytest.approx(40 ** 0.9)  # the empty regions
    g = [0.1] * 30 + [0.95] * 10  # 30 of class 0 became easy
    z, t = two_class_logits(g + [0.5] * 40, [0] * 40 + [1] * 40)
    w = loss.example_weights_of(loss.gradient_norm(z, t), t)
    assert w[:40].sum().item() == pytest.approx(40.0) and w[40:].sum().item() == pytest.approx(40.0)
    assert w[0].item() / w[39].item() == pytest.approx(40 ** 0.9)  # the paper's intra-class ratio


def test_weight_sum_bounds_the_step_of_an_isolated_hard_example():
    """The divergence of `reduction: mean` (docs/ghm_cwap.md): a head class whose examples all
    sat in one region gives a newly hard example W ~ n^alpha; with `mean` its batch's logit
    gradient grows with W, with `weight_sum` it stays below one example's."""
    n, batch = 5000, 128
    grads = {}
    for reduction in ("mean", "weight_sum"):
        loss = build_loss("ghm_cwap", {"approximation": "ura", "gamma": 0.0, "reduction": reduction,
                                        "normalization": "none"},
                          class_counts=[n, 50]).double()
        loss.on_epoch_start(0)
        easy, _ = two_class_logits([0.01] * n, [0] * n)  # every head example in region 0
        loss(easy, torch.zeros(n, dtype=torch.int64))
        loss.on_epoch_start(1)
        assert loss.region_weights[0, -1].item() == pytest.approx(n ** 0.9, rel=1e-9)  # empty region: one example
        z, t = two_class_logits([0.01] * (batch - 1) + [0.99], [0] * batch)
        z.requires_grad_(True)
        loss(z, t).backward()
        grads[reduction] = z.grad.norm().item()
    # one example's logit gradient p - onehot has norm sqrt(2) * 0.99 here
    assert grads["mean"] > 10 * math.sqrt(2) * 0.99
    assert grads["weight_sum"] <= math.sqrt(2) * 0.99 + 1e-9


def test_max_weight_clips_the_weights():
    for normalization, expect in [("none", [2.5, 3.0, 1.0]), ("class", [2.5 / 3.75, 5 / 3.75, 1.0])]:
        loss = ghm({"approximation": "ura", "normalization": normalization, "max_weight": 3.0})
        run_epoch0(loss)
        z, t = two_class_logits([0.45, 0.8, 0.2], [0, 0, 1])
        w = loss.example_weights_of(loss.gradient_norm(z, t), t)
        assert w.tolist() == pytest.approx(expect, rel=1e-12)
    loss = ghm({"approximation": "ura", "normalization": "class", "max_weight": 1.0})
    run_epoch0(loss)
    w = loss.example_weights_of(loss.gradient_norm(z, t), t)
    assert w.tolist() == pytest.approx([2.5 / 3.75, 1.0, 1.0], rel=1e-12)


def test_hand_worked_aura_widths_and_values():
    loss = ghm({"approximation": "aura", "normalization": "none"})
    run_epoch0(loss)
    # epoch 0 counted in widths 1/4: v = count / (4 * 1/4) = [4, 4, 0, 1]
    # d = 1 / log max(v, e) = [1/log 4, 1/log 4, 1, 1], normalised to sum 1
    raw = [1 / math.log(4), 1 / math.log(4), 1.0, 1.0]
    a, b = raw[0] / sum(raw), 1 / sum(raw)
    assert loss.count_widths[0].tolist() == pytest.approx([a, a, b, b], rel=1e-12)
    assert loss.count_widths.sum(1).tolist() == pytest.approx([1.0, 1.0])
    assert loss.count_widths[1].tolist() == pytest.approx([0.25] * 4)  # v = [0, 0, 1, 0] <= e: equal widths
    # dense regions (4 examples) are narrower than sparse ones (0 or 1)
    assert a < 0.25 < b
    # epoch 1: class 0 at g = 0.1 x3, 0.45 x2, 0.22 x1. New edges: a = .2095, 2a = .4191, 2a + b = .7095
    # -> counts [3, 1, 2, 0]. Weights still come from epoch 0's regions (widths 1/4):
    # g = 0.45 is region 1 there (W 2.5) but region 2 in the new widths (W 5 there).
    z, t = two_class_logits([0.1] * 3 + [0.45] * 2 + [0.22], [0] * 6)
    assert loss.example_weights_of(loss.gradient_norm(z, t), t).tolist() == pytest.approx([2.5] * 6)
    loss(z, t)
    assert loss.counts[0].tolist() == [3, 1, 2, 0]
    loss.on_epoch_start(2)
    v = [3 / (4 * a), 1 / (4 * a), 2 / (4 * b), 0.0]  # Algorithm 1: each example adds 1/(N d_i)
    S = sum(math.sqrt(x) for x in v)
    assert loss.effective_size[0].item() == pytest.approx(S, rel=1e-12)
    # the empty region counts one example: v = 1 / (4 b)
    expect = [S / math.sqrt(v[0]), S / math.sqrt(v[1]), S / math.sqrt(v[2]), S / math.sqrt(1 / (4 * b))]
    assert loss.region_weights[0].tolist() == pytest.approx(expect, rel=1e-12)
    assert loss.lookup_widths[0].tolist() == pytest.approx([a, a, b, b], rel=1e-12)
    d = [1 / math.log(max(x, math.e)) for x in v]  # v_0 = 3.58 > e; the others <= e
    assert loss.count_widths[0].tolist() == pytest.approx([x / sum(d) for x in d], rel=1e-12)
    # class 1 was absent in epoch 1: its histogram, S and widths are kept
    assert loss.effective_size[1].item() == 1.0 and loss.count_widths[1].tolist() == pytest.approx([0.25] * 4)


def test_aura_widths_sum_to_one_and_narrow_where_counts_are_dense():
    loss = build_loss("ghm_cwap", {"bins": 10, "approximation": "aura"}, class_counts=[500, 500])
    gen = torch.Generator().manual_seed(0)
    g = torch.cat([torch.rand(400, generator=gen) * 0.1, torch.rand(100, generator=gen)])  # dense near 0
    target = torch.zeros(500, dtype=torch.int64)
    loss.on_epoch_start(0)
    for _ in range(3):
        loss.accumulate(g.double(), target)
        loss.on_epoch_start(int(loss.current_epoch) + 1)
        widths = loss.count_widths[0]
        assert widths.sum().item() == pytest.approx(1.0, abs=1e-12) and (widths > 0).all()
    assert widths[0] < widths[-1]  # dense first region narrower than the sparse last one
    assert widths[0] < 0.1 < widths[-1]


def test_equals_cross_entropy_when_weights_are_one_and_margins_zero():
    z, t = two_class_logits(*EPOCH0)
    ce = F.cross_entropy(z, t)
    for approximation in ("ura", "aura"):
        for grad_norm in ("target", "l2"):
            # alpha 0 with class normalisation: every W is 1; gamma 0: no margins -> CE at every epoch
            loss = ghm({"alpha": 0.0, "gamma": 0.0, "approximation": approximation, "grad_norm": grad_norm,
                        "normalization": "class"})
            for epoch in range(3):
                loss.on_epoch_start(epoch)
                assert loss(z, t).item() == pytest.approx(ce.item(), rel=1e-12)
            w = loss.example_weights_of(loss.gradient_norm(z, t), t)
            assert torch.equal(w, torch.ones_like(w))
    # example_weights false and gamma 0: CE too
    loss = ghm({"example_weights": False, "gamma": 0.0})
    run_epoch0(loss)
    assert loss(z, t).item() == pytest.approx(ce.item(), rel=1e-12)


def test_gradient_norms_by_hand():
    z = torch.tensor([[math.log(2.0), 0.0, math.log(0.5)]], dtype=torch.float64)  # p = [4, 2, 1] / 7
    t = torch.tensor([1])
    target_norm = ghm(counts=(1, 1, 1)).gradient_norm(z, t)
    l2 = ghm({"grad_norm": "l2"}, counts=(1, 1, 1)).gradient_norm(z, t)
    assert target_norm.item() == pytest.approx(5 / 7)
    # p - e_1 = [4/7, -5/7, 1/7]: L2 = sqrt(42) / 7, divided by sqrt 2
    assert l2.item() == pytest.approx(math.sqrt(42) / 7 / math.sqrt(2))
    # both lie in [0, 1] for extreme logits (the last region includes g = 1)
    ext = torch.tensor([[80.0, -80.0, 0.0], [-80.0, 80.0, 0.0]], dtype=torch.float64)
    for name in ("target", "l2"):
        loss = ghm({"grad_norm": name}, counts=(1, 1, 1))
        g = loss.gradient_norm(ext, torch.tensor([0, 0]))
        assert ((g >= 0) & (g <= 1)).all()
        assert loss.region_of(g, torch.tensor([0, 0]), loss.count_widths).tolist() == [0, 3]


def test_gradcheck_with_weights_and_margins():
    loss = ghm({"approximation": "aura"}, counts=(9, 1))
    run_epoch0(loss)
    assert (loss.region_weights != 1).any() and (loss.margins(torch.tensor([0])) != 0).any()
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(5, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.tensor([0, 0, 1, 0, 1])
    state = copy.deepcopy(loss.state_dict())

    def f(logits):
        loss.load_state_dict(copy.deepcopy(state))  # counting does not change this epoch's weights anyway
        return loss(logits, t)

    assert torch.autograd.gradcheck(f, (z,))
    # the gradient is the weighted CE gradient with W and M held fixed
    w = loss.example_weights_of(loss.gradient_norm(z, t), t)
    zz = z.detach().clone().requires_grad_(True)
    (w * F.cross_entropy(zz + loss.margins(t), t, reduction="none")).mean().backward()
    z.grad = None
    f(z).backward()
    assert torch.allclose(z.grad, zz.grad, rtol=1e-12)


def test_class_absent_from_an_epoch_and_a_class_never_seen():
    loss = ghm({"approximation": "aura"}, counts=(9, 1, 3))
    loss.on_epoch_start(0)
    z, t = two_class_logits(*EPOCH0)
    z = torch.cat([z, torch.zeros(len(t), 1, dtype=torch.float64)], 1)  # class 2: never in a batch
    loss(z, t)
    loss.on_epoch_start(1)
    kept = {k: v.clone() for k, v in loss.state_dict().items()}
    assert loss.effective_size[2] == 0 and torch.equal(loss.region_weights[2], torch.ones(4, dtype=torch.float64))
    # epoch 1 has only class 0: class 1 keeps its histogram
    z0 = torch.zeros(3, 3, dtype=torch.float64)
    loss(z0, torch.tensor([0, 0, 0]))
    loss.on_epoch_start(2)
    for key in ("region_weights", "lookup_widths", "count_widths"):
        assert torch.equal(loss.state_dict()[key][1:], kept[key][1:]), key
    assert loss.effective_size[1:].tolist() == kept["effective_size"][1:].tolist() == [1.0, 0.0]
    # margins: finite; 0 wherever the never-seen class 2 is involved; class 0 -> 1 negative
    m = loss.margins(torch.tensor([0, 1, 2]))
    assert torch.isfinite(m).all()
    assert m[:, 2].tolist() == [0.0, 0.0, 0.0] and m[2].tolist() == [0.0, 0.0, 0.0] and m[0, 1] < 0
    z2 = torch.tensor([[80.0, -80.0, 0.0], [-80.0, 80.0, 0.0], [0.0, 0.0, -80.0]], dtype=torch.float64,
                      requires_grad=True)
    value = loss(z2, torch.tensor([0, 1, 2]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z2.grad).all()


def test_empty_regions_and_small_values_stay_finite():
    # one example per class in epoch 0, AURA with 30 regions: most regions empty, every v <= 1
    loss = build_loss("ghm_cwap", {"normalization": "none"}, class_counts=[1, 1, 1]).double()
    loss.on_epoch_start(0)
    z = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 9.0, -9.0]], dtype=torch.float64)
    t = torch.tensor([0, 1, 2])
    loss(z, t)
    for epoch in range(1, 4):
        loss.on_epoch_start(epoch)
        for key, value in loss.state_dict().items():
            assert torch.isfinite(value.double()).all(), key
        assert (loss.region_weights > 0).all() and (loss.count_widths > 0).all()
        assert loss.count_widths.sum(1).tolist() == pytest.approx([1.0] * 3)
        assert torch.isfinite(loss(z, t))


def test_bad_parameters():
    for params, match in [({"bins": 0}, "bins must be an integer >= 1"),
                          ({"alpha": 1.5}, "alpha must be a finite number >= 0 and <= 1"),
                          ({"gamma": -1.0}, "gamma must be a finite number >= 0"),
                          ({"approximation": "exact"}, "approximation must be one of 'aura', 'ura'"),
                          ({"grad_norm": "l1"}, "grad_norm must be one of 'target', 'l2'"),
                          ({"normalization": "batch"}, "normalization must be one of 'none', 'class'"),
                          ({"reduction": "sum"}, "reduction must be one of 'weight_sum', 'mean'"),
                          ({"max_weight": 0.5}, "max_weight must be a finite number >= 1"),
                          ({"example_weights": "yes"}, "example_weights must be true or false")]:
        with pytest.raises(ValueError, match=match):
            build_loss("ghm_cwap", params, class_counts=[3, 1])


def test_state_dict_round_trip_and_defaults():
    loss = build_loss("ghm_cwap", class_counts=[9, 1])
    assert (loss.bins, loss.alpha, loss.gamma, loss.approximation, loss.grad_norm, loss.normalization,
            loss.reduction) == (30, 0.9, 0.8, "aura", "target", "none", "weight_sum")
    run_epoch0(loss.double())
    z, t = two_class_logits([0.3, 0.7], [0, 1])
    loss(z, t)
    state = loss.state_dict()
    assert "_pending" not in state
    keys = {"counts", "count_widths", "lookup_widths", "region_weights", "effective_size", "current_epoch"}
    assert keys <= set(state)
    fresh = build_loss("ghm_cwap", class_counts=[9, 1]).double()
    fresh.load_state_dict(state)
    assert torch.equal(fresh(z, t), loss(z, t))
    fresh.on_epoch_start(2)
    loss.on_epoch_start(2)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), loss.state_dict().values()))
    loss.on_epoch_start(2)  # the same epoch again: nothing happens
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), loss.state_dict().values()))


def test_sync_statistics_adds_the_other_ranks_counts(monkeypatch):
    loss = ghm({"approximation": "ura"})
    loss.on_epoch_start(0)
    z, t = two_class_logits(*EPOCH0)
    loss(z, t)
    own = loss.counts.clone()
    loss.sync_statistics()  # one process: counts kept, increment record cleared
    assert torch.equal(loss.counts, own) and loss._pending.sum() == 0
    # two ranks, the other one saw the same batch plus one class-1 example in region 0
    other = own.clone()
    other[1, 0] += 1
    loss(z, t)

    def fake_all_reduce_sum(tensor):
        tensor += other
        return tensor

    monkeypatch.setattr(mod, "context", lambda: DistContext(0, 2))
    monkeypatch.setattr(mod, "all_reduce_sum", fake_all_reduce_sum)
    loss.sync_statistics()
    assert torch.equal(loss.counts, 2 * own + other) and loss._pending.sum() == 0


def test_trainer_resume_equals_uninterrupted(tmp_path, monkeypatch):
    from conftest import full_and_resumed, tiny_arrays, tiny_config
    from longtail.io import safe_torch_load

    cfg = tiny_config(**{"train.epochs": 3, "loss.name": "ghm_cwap", "loss.params": {"bins": 6}})
    _, _, cut = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=1, arrays=tiny_arrays(),
                                 evaluate=False)
    a = safe_torch_load(tmp_path / "full/checkpoints/last.pt")
    b = safe_torch_load(tmp_path / "cut/checkpoints/last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["loss"][k], b["loss"][k]) for k in a["loss"])
    # the cut checkpoint holds epoch 1's counts (every image once) and epoch 0's histogram
    state = cut["loss"]
    n_train = int(state["class_counts"].sum())
    assert int(state["current_epoch"]) == 1 and int(state["counts"].sum()) == n_train
    assert torch.equal(state["counts"].sum(1), state["class_counts"].long())
    assert (state["effective_size"] > 0).all() and (state["region_weights"] != 1).any()
    assert not torch.equal(state["count_widths"], torch.full_like(state["count_widths"], 1 / 6))  # AURA moved
    assert int(a["loss"]["current_epoch"]) == 2 and not torch.equal(a["loss"]["effective_size"],
                                                                    state["effective_size"])
