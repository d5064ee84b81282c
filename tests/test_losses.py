import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longtail.errors import ConfigError
from longtail.losses import build_loss, effective_number_weights, inverse_frequency_weights
from longtail.registry import LOSSES

COUNTS = [50, 20, 5]


def _batch(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, generator=g, dtype=dtype), torch.tensor([0, 1, 2, 2, 1, 0])


def test_ce_equals_f_cross_entropy():
    logits, target = _batch()
    assert torch.allclose(build_loss("ce", class_counts=COUNTS)(logits, target), F.cross_entropy(logits, target))


def test_class_balanced_beta_zero_is_ce():
    logits, target = _batch()
    loss = build_loss("class_balanced", {"beta": 0.0}, class_counts=COUNTS)
    assert torch.allclose(loss(logits, target), F.cross_entropy(logits, target))


def test_effective_number_weights_by_hand():
    # beta = 0.9: E_n = (1 - 0.9^n) / 0.1; w = 1/E_n normalised to sum C
    e = [(1 - 0.9**n) / 0.1 for n in COUNTS]
    w = [1 / v for v in e]
    s = sum(w)
    expected = [v / s * 3 for v in w]
    assert np.allclose(effective_number_weights(COUNTS, 0.9).numpy(), expected, atol=1e-6)
    assert effective_number_weights(COUNTS, 0.9).sum().item() == pytest.approx(3.0)
    assert np.allclose(inverse_frequency_weights([1, 2, 4]).numpy(), np.array([4, 2, 1]) / 7 * 3)


def test_class_balanced_hand_computed():
    # two samples, two classes with counts [3, 1], beta 0.5:
    # E = [(1 - 0.125) / 0.5, (1 - 0.5) / 0.5] = [1.75, 1.0]; w ~ [1/1.75, 1] normalised to sum 2
    w0, w1 = (1 / 1.75) / (1 / 1.75 + 1) * 2, 1 / (1 / 1.75 + 1) * 2
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 1])
    ce0 = math.log(1 + math.exp(-2.0))
    ce1 = math.log(1 + math.exp(-1.0))
    loss = build_loss("class_balanced", {"beta": 0.5}, class_counts=[3, 1])
    assert loss(logits, target).item() == pytest.approx((w0 * ce0 + w1 * ce1) / 2, rel=1e-6)  # official: / B
    loss_w = build_loss("class_balanced", {"beta": 0.5, "reduction": "weights"}, class_counts=[3, 1])
    assert loss_w(logits, target).item() == pytest.approx((w0 * ce0 + w1 * ce1) / (w0 + w1), rel=1e-6)


def test_weighted_ce_is_pytorch_weighted_mean():
    logits, target = _batch()
    loss = build_loss("ce", class_counts=COUNTS)
    w = torch.tensor([0.2, 0.8, 2.0])
    loss.set_class_weight(w)
    per = F.cross_entropy(logits, target, reduction="none")
    assert torch.allclose(loss(logits, target), (per * w[target]).sum() / w[target].sum())
    with pytest.raises(ValueError, match="shape"):
        loss.set_class_weight(torch.ones(4))


# gradcheck compares the analytic gradient with finite differences of the forward value.
# Seesaw's compensation factor is computed from detached logits (official), so its
# gradient is by design not the derivative of the value: gradcheck runs it with q = 0,
# and test_seesaw_gradient_holds_factors_fixed checks the q > 0 gradient.
GRADCHECK_PARAMS = {"seesaw": {"q": 0.0}}


def _frozen(loss):
    """loss as a pure function: its state (online counts, EMA, RNG) restored before each call."""
    state = copy.deepcopy(loss.state_dict())

    def f(z, target):
        loss.load_state_dict(copy.deepcopy(state))
        return loss(z, target)

    return f


@pytest.mark.parametrize("name", LOSSES.names())
def test_gradcheck_every_loss(name):
    logits, target = _batch(dtype=torch.float64)
    logits.requires_grad_(True)
    loss = build_loss(name, GRADCHECK_PARAMS.get(name), class_counts=COUNTS).double()
    loss(logits.detach(), target)  # one step first, so stateful losses have non-trivial state
    f = _frozen(loss)
    assert torch.autograd.gradcheck(lambda z: f(z, target), (logits,))


@pytest.mark.parametrize("name", LOSSES.names())
def test_contract_every_loss(name):
    logits, target = _batch()
    logits.requires_grad_(True)
    value = build_loss(name, class_counts=COUNTS)(logits, target)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(logits.grad).all()


def test_bad_parameters():
    with pytest.raises(ConfigError, match="has no parameter 'betta' \\(did you mean 'beta'\\?\\)"):
        build_loss("class_balanced", {"betta": 0.9}, class_counts=COUNTS)
    with pytest.raises(ValueError, match="beta must be"):
        build_loss("class_balanced", {"beta": 1.0}, class_counts=COUNTS)
    with pytest.raises(ConfigError, match="unknown loss 'focall'"):
        build_loss("focall", class_counts=COUNTS)


# ----------------------------------------------------------------------------- every loss

# keyword arguments that make each loss plain softmax cross-entropy: each loss class states them
# as `neutral_params` (None where no setting does: sigmoid losses, balanced softmax)
NEUTRAL = {name: LOSSES.get(name).neutral_params for name in LOSSES.names()
           if getattr(LOSSES.get(name), "neutral_params", None) is not None}


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_states_its_neutral_setting(name):
    # a new loss must say in its own class body whether it has a cross-entropy setting
    # (`neutral_params`: a dict, or None with the reason in a comment); nothing is inherited
    cls = LOSSES.get(name)
    assert "neutral_params" in vars(cls), f"loss '{name}' ({cls.__name__}) does not state neutral_params"
    assert cls.neutral_params is None or isinstance(cls.neutral_params, dict)


def test_neutral_settings_cover_the_softmax_losses():
    # the registry-driven list is not empty by accident, and sigmoid losses have none
    assert {"ce", "focal", "ldam", "logit_adjustment", "swrm"} <= set(NEUTRAL)
    assert not {"cb_sigmoid", "cb_focal", "ghm_c", "balanced_softmax"} & set(NEUTRAL)


@pytest.mark.parametrize("name", sorted(NEUTRAL))
def test_neutral_setting_is_cross_entropy(name):
    logits, target = _batch()
    loss = build_loss(name, NEUTRAL[name], class_counts=COUNTS)
    for _ in range(2):  # stateful losses too, after their state has moved
        assert torch.allclose(loss(logits, target), F.cross_entropy(logits, target), atol=1e-6)


def test_more_neutral_settings():
    logits, target = _batch()
    ce = F.cross_entropy(logits, target)

    def value(name, params, counts=COUNTS):
        return build_loss(name, params, class_counts=counts)(logits, target)

    assert torch.allclose(value("balanced_softmax", {}, [7, 7, 7]), ce)
    assert torch.allclose(value("softmax_eql", {"lambda_": 0.0}), ce)
    # gamma 1 drops every rare negative; with no rare class (lambda below every frequency) it is CE
    assert torch.allclose(value("softmax_eql", {"gamma": 1.0, "lambda_": 0.05}), ce)
    assert torch.allclose(value("focal", {"gamma": 0.0, "p_source": "p_y"}), ce)
    zero = {"smooth_head": 0.0, "smooth_tail": 0.0, "shape": "exp", "power": 2.0}
    assert torch.allclose(value("label_aware_smoothing", zero), ce)


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_honours_the_class_weight(name):
    # all-ones weight == unweighted; a non-uniform weight changes the value
    logits, target = _batch(dtype=torch.float64)
    loss = build_loss(name, class_counts=COUNTS).double()
    f = _frozen(loss)
    plain = f(logits, target)
    loss.set_class_weight(torch.ones(3))
    assert torch.allclose(f(logits, target), plain, rtol=1e-12)
    loss.set_class_weight(torch.tensor([0.2, 0.8, 2.0]))
    assert not torch.allclose(f(logits, target), plain, rtol=1e-3)
    loss.set_class_weight(None)
    assert torch.allclose(f(logits, target), plain, rtol=1e-12)


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_has_a_docstring_summary(name):
    assert LOSSES.summary(name)


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_is_finite_for_extreme_logits(name):
    target = torch.tensor([0, 1, 2, 2])
    logits = torch.tensor([[80.0, -80.0, 0.0], [-80.0, 80.0, 0.0], [80.0, -80.0, 0.0], [0.0, 0.0, -80.0]],
                          requires_grad=True)
    value = build_loss(name, class_counts=COUNTS)(logits, target)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


# ----------------------------------------------------------------------------- focal


def test_focal_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    target = torch.tensor([0, 1])
    # sample 0: p_y = 1/2, CE = log 2; sample 1: p_y = 3/4, CE = log(4/3)
    # gamma 2: ((1/2)^2 log 2 + (1/4)^2 log(4/3)) / 2
    loss = build_loss("focal", {"gamma": 2.0}, class_counts=[1, 1])
    assert loss(logits, target).item() == pytest.approx((math.log(2) / 4 + math.log(4 / 3) / 16) / 2, rel=1e-6)
    # class weight [2, 1], official: l_0 = 2 log 2, p_0 = exp(-2 log 2) = 1/4 (not p_y = 1/2),
    # term (3/4)^2 * 2 log 2; sample 1 unchanged; plain mean over B = 2 (not / sum w = 3)
    loss.set_class_weight(torch.tensor([2.0, 1.0]))
    official = (9 / 16 * 2 * math.log(2) + math.log(4 / 3) / 16) / 2
    assert loss(logits, target).item() == pytest.approx(official, rel=1e-6)
    # p from the unweighted CE: w (1 - p_y)^2 CE = 2 * 1/4 * log 2
    paper = build_loss("focal", {"gamma": 2.0, "p_source": "p_y"}, class_counts=[1, 1])
    paper.set_class_weight(torch.tensor([2.0, 1.0]))
    assert paper(logits, target).item() == pytest.approx((math.log(2) / 2 + math.log(4 / 3) / 16) / 2, rel=1e-6)


def test_focal_weighted_gamma_zero_is_plain_mean_of_weighted_ce():
    logits, target = _batch()
    w = torch.tensor([0.2, 0.8, 2.0])
    loss = build_loss("focal", {"gamma": 0.0}, class_counts=COUNTS)
    loss.set_class_weight(w)
    per = F.cross_entropy(logits, target, reduction="none") * w[target]
    assert torch.allclose(loss(logits, target), per.mean())  # / B, not / sum w


# ----------------------------------------------------------------------------- class-balanced variants


def _cb_weights_31():
    # counts [3, 1], beta 0.5: E = [1.75, 1.0]; w ~ [1/1.75, 1] normalised to sum 2
    return (1 / 1.75) / (1 / 1.75 + 1) * 2, 1 / (1 / 1.75 + 1) * 2


def _bce(z, y):
    return math.log(1 + math.exp(-z)) if y == 1 else math.log(1 + math.exp(z))


def _sig(z):
    return 1 / (1 + math.exp(-z))


def test_cb_sigmoid_hand_computed():
    w0, w1 = _cb_weights_31()
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 1])
    s0 = _bce(2.0, 1) + _bce(0.0, 0)  # sample 0: positive z=2, negative z=0
    s1 = _bce(0.0, 0) + _bce(1.0, 1)
    loss = build_loss("cb_sigmoid", {"beta": 0.5}, class_counts=[3, 1])
    # the sample's weight multiplies both binary terms; divided by B = sum(one-hot) = 2
    assert loss(logits, target).item() == pytest.approx((w0 * s0 + w1 * s1) / 2, rel=1e-6)
    loss_w = build_loss("cb_sigmoid", {"beta": 0.5, "reduction": "weights"}, class_counts=[3, 1])
    assert loss_w(logits, target).item() == pytest.approx((w0 * s0 + w1 * s1) / (w0 + w1), rel=1e-6)


def test_cb_sigmoid_beta_zero_is_bce_sum_over_batch():
    logits, target = _batch()
    onehot = F.one_hot(target, 3).float()
    expected = F.binary_cross_entropy_with_logits(logits, onehot, reduction="sum") / len(target)
    assert torch.allclose(build_loss("cb_sigmoid", {"beta": 0.0}, class_counts=COUNTS)(logits, target), expected)


def test_cb_focal_hand_computed_and_gamma_zero():
    w0, w1 = _cb_weights_31()
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 1])
    # gamma 1: modulator 1 - sigmoid(z) for the positive, sigmoid(z) for the negative
    s0 = (1 - _sig(2.0)) * _bce(2.0, 1) + _sig(0.0) * _bce(0.0, 0)
    s1 = _sig(0.0) * _bce(0.0, 0) + (1 - _sig(1.0)) * _bce(1.0, 1)
    loss = build_loss("cb_focal", {"beta": 0.5}, class_counts=[3, 1])
    assert loss.gamma == 1.0 and loss.beta == 0.5
    assert loss(logits, target).item() == pytest.approx((w0 * s0 + w1 * s1) / 2, rel=1e-6)
    g0 = build_loss("cb_focal", {"beta": 0.5, "gamma": 0.0}, class_counts=[3, 1])
    sig = build_loss("cb_sigmoid", {"beta": 0.5}, class_counts=[3, 1])
    assert torch.allclose(g0(logits, target), sig(logits, target))


def test_cb_focal_modulator_is_stable_for_very_negative_logits():
    # naive log1p(exp(-z)) overflows at z = -200 and gives NaN gradients
    logits = torch.tensor([[-200.0, 200.0, -200.0]], requires_grad=True)
    value = build_loss("cb_focal", {"gamma": 2.0}, class_counts=COUNTS)(logits, torch.tensor([0]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    # positive at z = -200: (1 - sigmoid)^2 ~ 1, BCE ~ 200; negative at z = 200: sigmoid^2 ~ 1, BCE ~ 200
    assert value.item() == pytest.approx(400 * effective_number_weights(COUNTS, 0.9999)[0].item(), rel=1e-4)


# ----------------------------------------------------------------------------- LDAM


def test_ldam_margins_and_hand_computed():
    # counts [16, 1]: n^(-1/4) = [1/2, 1] -> rescaled to max 0.5 -> [0.25, 0.5]
    loss = build_loss("ldam", {"s": 2.0}, class_counts=[16, 1])
    assert loss.margins.tolist() == pytest.approx([0.25, 0.5])
    # target 0, z = [0.5, 0]: z_hat = [0.25, 0], s z_hat = [0.5, 0], CE = log(1 + e^-0.5)
    # target 1, z = [0, 0.5]: z_hat = [0, 0], CE = log 2
    logits = torch.tensor([[0.5, 0.0], [0.0, 0.5]])
    expected = (math.log(1 + math.exp(-0.5)) + math.log(2)) / 2
    assert loss(logits, torch.tensor([0, 1])).item() == pytest.approx(expected, rel=1e-6)


def test_ldam_defaults_and_class_weight_is_pytorch_weighted_mean():
    loss = build_loss("ldam", class_counts=COUNTS)
    assert loss.s == 30.0 and loss.margins.max().item() == pytest.approx(0.5)
    assert loss.margins.argmax().item() == 2  # the rarest class gets max_m
    logits, target = _batch()
    w = torch.tensor([0.2, 0.8, 2.0])
    loss.set_class_weight(w)
    z_hat = logits - F.one_hot(target, 3) * loss.margins[target][:, None]
    assert torch.allclose(loss(logits, target), F.cross_entropy(30 * z_hat, target, weight=w))


def test_ldam_zero_count_class_is_finite():
    loss = build_loss("ldam", class_counts=[16, 1, 0])
    assert loss.margins.tolist() == pytest.approx([0.25, 0.5, 0.5])


# ----------------------------------------------------------------------------- balanced softmax / logit adjustment


def test_balanced_softmax_hand_computed():
    # counts [3, 1], z = 0: adjusted [log 3, log 1]; target 1: log(3 + 1) - 0 = log 4;
    # target 0: log 4 - log 3
    loss = build_loss("balanced_softmax", {"eps": 0.0}, class_counts=[3, 1])
    logits = torch.zeros(2, 2)
    assert loss(logits, torch.tensor([1, 0])).item() == pytest.approx((math.log(4) + math.log(4 / 3)) / 2, rel=1e-6)
    default = build_loss("balanced_softmax", class_counts=[3, 1])  # eps 1e-6: within 1e-6
    assert default(logits, torch.tensor([1, 0])).item() == pytest.approx((math.log(4) + math.log(4 / 3)) / 2, rel=1e-5)


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_balanced_softmax_zero_count_class_no_nan(eps):
    logits, _ = _batch()
    target = torch.tensor([0, 2, 2, 0, 2, 0])  # class 1 has no training image
    logits.requires_grad_(True)
    value = build_loss("balanced_softmax", {"eps": eps}, class_counts=[5, 0, 5])(logits, target)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    # class 1 is (all but) absent from the denominator: CE over classes {0, 2}
    sub = F.cross_entropy(logits[:, [0, 2]], torch.tensor([0, 1, 1, 0, 1, 0]))
    assert value.item() == pytest.approx(sub.item(), abs=1e-4)


def test_logit_adjustment_hand_computed():
    # counts [3, 1]: pi = [3/4, 1/4]; z = 0, target 1
    logits = torch.zeros(1, 2)
    target = torch.tensor([1])
    # tau 1: adjusted [log 3/4, log 1/4]: CE = log(3/4 + 1/4) - log(1/4) = log 4
    assert build_loss("logit_adjustment", class_counts=[3, 1])(logits, target).item() == pytest.approx(math.log(4))
    # tau 2: pi^2 = [9/16, 1/16]: CE = log(10/16) - log(1/16) = log 10
    loss = build_loss("logit_adjustment", {"tau": 2.0}, class_counts=[3, 1])
    assert loss(logits, target).item() == pytest.approx(math.log(10), rel=1e-6)


def test_logit_adjustment_equals_balanced_softmax_at_tau_one():
    # log pi and log n differ by a constant shift, so the losses agree
    logits, target = _batch()
    la = build_loss("logit_adjustment", class_counts=COUNTS)(logits, target)
    bs = build_loss("balanced_softmax", {"eps": 0.0}, class_counts=COUNTS)(logits, target)
    assert torch.allclose(la, bs, atol=1e-6)


# ----------------------------------------------------------------------------- seesaw


def test_seesaw_hand_computed():
    # batch targets [0, 0]: counts become [2, 0, 0] BEFORE the loss; N = clamp >= 1 = [2, 1, 1]
    # label 0: mitigation S = [1, (1/2)^p, (1/2)^p]
    # sample A, z = [0, 0, 0]: sigma = [1/3] * 3, no sigma_j > sigma_0, so compensation 1;
    #   loss_A = -log(1 / (1 + 2 (1/2)^p))
    # sample B, z = [0, log 2, 0]: sigma = [1/4, 1/2, 1/4], C_01 = 2^q, C_02 = 1;
    #   exp(z') = [1, 2 * (1/2)^p * 2^q, (1/2)^p]; loss_B = log(1 + 2^(1+q) (1/2)^p + (1/2)^p)
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(2), 0.0]])
    target = torch.tensor([0, 0])
    # p = q = 1: loss_A = log 2, loss_B = log(1 + 2 + 0.5) = log 3.5; mean = log(7) / 2
    loss = build_loss("seesaw", {"p": 1.0, "q": 1.0}, class_counts=[1, 1, 1])
    assert loss(logits, target).item() == pytest.approx(math.log(7) / 2, rel=1e-6)
    assert loss.cum_samples.tolist() == [2, 0, 0]
    # defaults p = 0.8, q = 2: loss_A = log(1 + 2 h), loss_B = log(1 + 8 h + h), h = 0.5^0.8
    h = 0.5**0.8
    default = build_loss("seesaw", class_counts=[1, 1, 1])
    assert (default.p, default.q, default.eps) == (0.8, 2.0, 0.01)
    expected = (math.log(1 + 2 * h) + math.log(1 + 9 * h)) / 2
    assert default(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_seesaw_counts_accumulate_and_mitigation_uses_them():
    loss = build_loss("seesaw", {"q": 0.0}, class_counts=COUNTS)
    logits = torch.zeros(4, 3)
    loss(logits, torch.tensor([0, 0, 0, 1]))
    assert loss.cum_samples.tolist() == [3, 1, 0]
    loss(logits[:2], torch.tensor([2, 1]))
    assert loss.cum_samples.tolist() == [3, 2, 1]
    # next batch [0]: counts [4, 2, 1]; label 0: S = [1, (2/4)^0.8, (1/4)^0.8]; z = 0
    value = loss(torch.zeros(1, 3), torch.tensor([0]))
    assert loss.cum_samples.tolist() == [4, 2, 1]
    assert value.item() == pytest.approx(math.log(1 + 0.5**0.8 + 0.25**0.8), rel=1e-6)
    # a label of the rarer class is not mitigated against the frequent ones (N_j > N_i: 1)
    value = loss(torch.zeros(1, 3), torch.tensor([2]))  # counts [4, 2, 2]
    assert value.item() == pytest.approx(math.log(3), rel=1e-6)


def test_seesaw_compensation_eps_clamps_the_divisor():
    # target prob sigma_0 = e^-20 / (...) ~ 2e-9 < eps: ratio sigma_j / 0.01; sigma_1 ~ 1 -> C_01 = 100^q
    loss = build_loss("seesaw", {"p": 0.0, "q": 1.0}, class_counts=[1, 1])
    logits = torch.tensor([[-10.0, 10.0]], dtype=torch.float64)
    s1 = 1 / (1 + math.exp(-20))
    expected = math.log(math.exp(-10) + math.exp(10) * s1 / 0.01) + 10
    assert loss(logits, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-9)


def test_seesaw_gradient_holds_factors_fixed():
    logits, target = _batch(dtype=torch.float64)
    logits.requires_grad_(True)
    loss = build_loss("seesaw", class_counts=COUNTS).double()
    loss(logits.detach(), target)
    f = _frozen(loss)
    f(logits, target).backward()
    grad = logits.grad.clone()
    # reference: CE(z + log(S C) on negatives) with S C computed once from the detached logits
    counts = loss.cum_samples.double()  # state after the frozen call = state + this batch
    n = counts.clamp(min=1)
    ratio = n[None, :] / n[:, None]
    mitig = torch.where(ratio < 1, ratio**0.8, torch.ones_like(ratio))[target]
    sig = F.softmax(logits.detach(), 1)
    r = sig / sig.gather(1, target[:, None]).clamp(min=0.01)
    comp = torch.where(r > 1, r**2, torch.ones_like(r))
    fixed = (mitig * comp).log() * (1 - F.one_hot(target, 3))
    z = logits.detach().clone().requires_grad_(True)
    F.cross_entropy(z + fixed, target).backward()
    assert torch.allclose(grad, z.grad)
    assert (comp > 1).any()  # the compensation factor was active in this batch


def test_seesaw_class_weight_is_mmdet_label_weight_mean():
    logits, target = _batch(dtype=torch.float64)
    w = torch.tensor([0.25, 0.75, 2.0], dtype=torch.float64)  # exact in float32
    weighted = build_loss("seesaw", class_counts=COUNTS).double()
    weighted.set_class_weight(w)
    value = weighted(logits, target)
    # per-sample seesaw CE from the same counts (after this batch) and logits
    z = logits + weighted.seesaw_factors(logits, target).log() * (1 - F.one_hot(target, 3))
    per = F.cross_entropy(z, target, reduction="none")
    assert value.item() == pytest.approx((per * w[target]).sum().item() / 6, rel=1e-12)  # / B, not / sum w


def test_seesaw_state_dict_round_trip_and_sync():
    loss = build_loss("seesaw", class_counts=COUNTS)
    logits, target = _batch()
    loss(logits, target)
    state = loss.state_dict()
    assert "cum_samples" in state and "_pending" not in state
    fresh = build_loss("seesaw", class_counts=COUNTS)
    fresh.load_state_dict(state)
    assert fresh.cum_samples.tolist() == [2, 2, 2]
    assert torch.equal(fresh(logits, target), loss(logits, target))
    assert fresh.cum_samples.tolist() == [4, 4, 4]
    # one process: sync keeps the counts and clears the increment record
    assert loss._pending.tolist() == [4, 4, 4]
    loss.sync_statistics()
    assert loss.cum_samples.tolist() == [4, 4, 4] and loss._pending.tolist() == [0, 0, 0]


# ----------------------------------------------------------------------------- softmax EQL


def test_softmax_eql_hand_computed():
    # counts [96, 3, 1]: f = [0.96, 0.03, 0.01]; lambda 0.05 -> classes 1, 2 rare; gamma 1: always drop
    loss = build_loss("softmax_eql", {"gamma": 1.0, "lambda_": 0.05}, class_counts=[96, 3, 1])
    assert loss.rare.tolist() == [False, True, True]
    a, b, c = 0.5, 1.5, -0.7
    logits = torch.tensor([[a, b, c], [a, b, c], [a, b, c]])
    # label 0: both rare negatives dropped: -a + log e^a = 0
    # label 1: class 2 dropped, class 0 kept (not rare): log(e^a + e^b) - b
    # label 2: class 1 dropped: log(e^a + e^c) - c
    expected = (0 + math.log(math.exp(a) + math.exp(b)) - b + math.log(math.exp(a) + math.exp(c)) - c) / 3
    assert loss(logits, torch.tensor([0, 1, 2])).item() == pytest.approx(expected, rel=1e-6)


def test_softmax_eql_drop_rate_target_kept_and_no_global_rng():
    loss = build_loss("softmax_eql", {"gamma": 0.3, "lambda_": 0.05}, class_counts=[96, 3, 1])
    target = torch.tensor([1, 2, 0, 1] * 500)
    rng = torch.get_rng_state()
    keep = loss.keep_mask(target, 3)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG was not used
    assert keep[torch.arange(len(target)), target].all()  # the target is never dropped
    assert keep[:, 0].all()  # class 0 is not rare
    negatives = torch.cat([keep[target != 1, 1], keep[target != 2, 2]])
    assert 1 - negatives.float().mean().item() == pytest.approx(0.3, abs=0.03)  # ~ Bernoulli(0.3)


def test_softmax_eql_seeded_and_state_round_trip():
    params = {"gamma": 0.5, "lambda_": 0.05}
    logits = torch.randn(64, 3, generator=torch.Generator().manual_seed(3))
    target = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(4))
    a = build_loss("softmax_eql", params, class_counts=[96, 3, 1])
    b = build_loss("softmax_eql", params, class_counts=[96, 3, 1])
    first = a(logits, target)
    assert torch.equal(first, b(logits, target))  # same seed, same draws
    c = build_loss("softmax_eql", {**params, "seed": 1}, class_counts=[96, 3, 1])
    assert not torch.equal(first, c(logits, target))
    state = copy.deepcopy(a.state_dict())
    nxt = a(logits, target)
    assert not torch.equal(first, nxt)  # fresh draws each call
    b.load_state_dict(state)
    assert torch.equal(b(logits, target), nxt)  # the generator state travels with the state_dict


def test_softmax_eql_gradcheck_with_drops():
    logits = torch.randn(8, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    loss = build_loss("softmax_eql", {"gamma": 0.5, "lambda_": 0.05}, class_counts=[96, 3, 1]).double()
    assert (~loss.keep_mask(target, 3)).any()
    f = _frozen(loss)
    assert torch.autograd.gradcheck(lambda z: f(z, target), (logits,))


# ----------------------------------------------------------------------------- GHM-C


GHM_Z = torch.tensor([[2.0, -1.0, 0.0]])
GHM_Y = torch.tensor([0])
# one-hot [1, 0, 0]; g = |sigmoid(z) - y| = [1 - 0.881, 0.269, 0.5] = [0.119, 0.269, 0.5]
# BCE terms: log(1 + e^-2), log(1 + e^-1), log 2
GHM_BCE = [math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1)), math.log(2)]


def test_ghm_c_hand_computed_without_momentum():
    # bins 2: edges [0, 0.5, 1 + 1e-6]; g = 0.5 falls in bin 1 (edges[1] <= g)
    # tot = 3; bin 0 holds 2 -> 3/2, bin 1 holds 1 -> 3/1; two non-empty bins: / 2
    # weights [0.75, 0.75, 1.5]; loss = sum(w * BCE) / 3
    loss = build_loss("ghm_c", {"bins": 2, "momentum": 0.0}, class_counts=[1, 1, 1])
    expected = (0.75 * GHM_BCE[0] + 0.75 * GHM_BCE[1] + 1.5 * GHM_BCE[2]) / 3
    for _ in range(2):  # no state without momentum
        assert loss(GHM_Z, GHM_Y).item() == pytest.approx(expected, rel=1e-6)


def test_ghm_c_momentum_sequence():
    loss = build_loss("ghm_c", {"bins": 2, "momentum": 0.5}, class_counts=[1, 1, 1])
    # call 1: acc = [0.5*0 + 0.5*2, 0.5*0 + 0.5*1] = [1, 0.5]; weights 3/acc / 2 = [1.5, 3]
    value = loss(GHM_Z, GHM_Y).item()
    assert loss.acc_sum.tolist() == pytest.approx([1.0, 0.5])
    assert value == pytest.approx((1.5 * GHM_BCE[0] + 1.5 * GHM_BCE[1] + 3 * GHM_BCE[2]) / 3, rel=1e-6)
    # call 2: acc = [0.5*1 + 0.5*2, 0.5*0.5 + 0.5*1] = [1.5, 0.75]; weights [3/1.5, 3/0.75] / 2 = [1, 2]
    value = loss(GHM_Z, GHM_Y).item()
    assert loss.acc_sum.tolist() == pytest.approx([1.5, 0.75])
    assert value == pytest.approx((GHM_BCE[0] + GHM_BCE[1] + 2 * GHM_BCE[2]) / 3, rel=1e-6)


def test_ghm_c_empty_bins_are_skipped():
    loss = build_loss("ghm_c", {"bins": 3, "momentum": 0.5}, class_counts=[1, 1])
    # edges [0, 1/3, 2/3, 1 + 1e-6]; z = [0, 0], y = [1, 0]: g = [0.5, 0.5] -> bin 1 only
    loss(torch.zeros(1, 2), torch.tensor([0]))
    assert loss.acc_sum.tolist() == pytest.approx([0.0, 1.0, 0.0])
    # z = [5, -5], y = [1, 0]: g = [0.0067, 0.0067] -> bin 0 only; bin 1 is empty and not decayed
    # tot 2, acc_0 = 1, one non-empty bin: weight 2/1/1 = 2; loss = 2 * 2 BCE(5, 1) / 2
    value = loss(torch.tensor([[5.0, -5.0]]), torch.tensor([0]))
    assert loss.acc_sum.tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert value.item() == pytest.approx(2 * math.log(1 + math.exp(-5)), rel=1e-5)  # float32


def test_ghm_c_bin_edges_follow_the_reference_comparisons():
    loss = build_loss("ghm_c", {"bins": 30, "momentum": 0.0}, class_counts=COUNTS)
    assert loss.edges[-1].item() == pytest.approx(1 + 1e-6)
    g = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    g[:31] = loss.edges  # values exactly on the edges (incl. 1 + 1e-6 -> out of every bin)
    g[31] = 1.0
    idx = torch.bucketize(g, loss.edges, right=True) - 1
    for k in range(30):  # the reference loop's test: edges[k] <= g < edges[k + 1]
        ref = (g >= loss.edges[k]) & (g < loss.edges[k + 1])
        assert torch.equal(idx == k, ref)


def test_ghm_c_defaults_and_state_round_trip():
    loss = build_loss("ghm_c", class_counts=COUNTS)
    assert (loss.bins, loss.momentum) == (30, 0.75)
    logits, target = _batch()
    loss(logits, target)
    state = copy.deepcopy(loss.state_dict())
    assert set(state) == {"class_counts", "acc_sum"} and state["acc_sum"].sum() > 0
    fresh = build_loss("ghm_c", class_counts=COUNTS)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(logits, target), loss(logits, target))
    assert torch.equal(fresh.acc_sum, loss.acc_sum)


def test_ghm_c_class_weight_multiplies_the_sample_terms():
    loss = build_loss("ghm_c", {"bins": 2, "momentum": 0.0}, class_counts=[1, 1, 1])
    loss.set_class_weight(torch.tensor([2.0, 1.0, 1.0]))
    # the only sample has label 0: all its terms x2, tot unchanged
    expected = 2 * (0.75 * GHM_BCE[0] + 0.75 * GHM_BCE[1] + 1.5 * GHM_BCE[2]) / 3
    assert loss(GHM_Z, GHM_Y).item() == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- label-aware smoothing


def test_label_aware_epsilons_by_shape():
    # counts [4, 2, 1]: N_1 = 4, N_K = 1, r = [1, 1/3, 0]; eps_1 = 0.3, eps_K = 0
    counts = [4, 2, 1]

    def eps(**kw):
        return build_loss("label_aware_smoothing", kw, class_counts=counts).smooth.tolist()

    assert eps() == pytest.approx([0.3, 0.3 * math.sin(math.pi / 6), 0.0])  # concave: [0.3, 0.15, 0]
    assert eps(shape="linear") == pytest.approx([0.3, 0.1, 0.0])
    # convex: 0.3 + 0.3 sin(3 pi/2 + pi r/2): r = 0 -> 0, r = 1/3 -> 0.3 - 0.3 cos(pi/6), r = 1 -> 0.3
    assert eps(shape="convex") == pytest.approx([0.3, 0.3 - 0.3 * math.cos(math.pi / 6), 0.0], abs=1e-7)
    assert eps(shape="exp", power=2.0) == pytest.approx([0.3, 0.3 / 9, 0.0])
    assert eps(smooth_head=0.4, smooth_tail=0.1, shape="linear") == pytest.approx([0.4, 0.2, 0.1])


def test_label_aware_smoothing_hand_computed():
    # counts [4, 2, 1], concave: eps_1 = 0.15 for label 1; z = [1, 0, 0]
    # -log p_1 = L = log(e + 2); mean_j -log p_j = L - 1/3
    # loss = 0.85 L + 0.15 (L - 1/3) = L - 0.05
    loss = build_loss("label_aware_smoothing", class_counts=[4, 2, 1])
    value = loss(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([1]))
    assert value.item() == pytest.approx(math.log(math.e + 2) - 0.05, rel=1e-6)


def test_label_aware_smoothing_equal_counts_no_division_by_zero():
    loss = build_loss("label_aware_smoothing", class_counts=[5, 5, 5])
    assert loss.smooth.tolist() == pytest.approx([0.3, 0.3, 0.3])  # every class is a head class
    logits, target = _batch()
    uniform = -F.log_softmax(logits, 1).mean(1).mean()
    expected = 0.7 * F.cross_entropy(logits, target) + 0.3 * uniform
    assert torch.allclose(loss(logits, target), expected)


# ----------------------------------------------------------------------------- parameter validation


@pytest.mark.parametrize("name, params, match", [
    ("focal", {"gamma": -1.0}, "gamma must be a finite number >= 0"),
    ("focal", {"p_source": "paper"}, "p_source must be one of 'weighted_ce', 'p_y'"),
    ("cb_sigmoid", {"beta": 1.0}, "beta must be a number in \\[0, 1\\)"),
    ("cb_focal", {"gamma": -0.5}, "gamma must be"),
    ("cb_focal", {"reduction": "mean"}, "reduction must be 'batch' or 'weights'"),
    ("ldam", {"max_m": -0.1}, "max_m must be a finite number >= 0"),
    ("ldam", {"s": 0.0}, "s must be a finite number > 0"),
    ("balanced_softmax", {"eps": -1e-6}, "eps must be"),
    ("logit_adjustment", {"tau": True}, "tau must be a finite number >= 0"),
    ("seesaw", {"p": -1.0}, "p must be"),
    ("seesaw", {"eps": 0.0}, "eps must be a finite number > 0"),
    ("softmax_eql", {"gamma": 1.5}, "gamma must be a finite number >= 0 and <= 1"),
    ("softmax_eql", {"seed": -1}, "seed must be an integer >= 0"),
    ("ghm_c", {"bins": 0}, "bins must be an integer >= 1"),
    ("ghm_c", {"momentum": 1.0}, "momentum must be a finite number >= 0 and < 1"),
    ("label_aware_smoothing", {"shape": "cubic"}, "shape must be one of 'concave', 'linear', 'convex', 'exp'"),
    ("label_aware_smoothing", {"shape": "exp"}, "power must be a number > 0 when shape is 'exp'"),
    ("label_aware_smoothing", {"power": 2.0}, "power is only used with shape 'exp'"),
    ("label_aware_smoothing", {"smooth_head": 1.5}, "smooth_head must be a finite number >= 0 and <= 1"),
])
def test_bad_loss_parameters(name, params, match):
    with pytest.raises(ValueError, match=match):
        build_loss(name, params, class_counts=COUNTS)


def test_unknown_parameter_names_the_allowed_ones():
    with pytest.raises(ConfigError, match="allowed: class_counts, gamma, lambda_, seed"):
        build_loss("softmax_eql", {"lambda": 0.01}, class_counts=COUNTS)


# ----------------------------------------------------------------------------- configs


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "cifar10_lt"
# one config per loss (other recipes in the folder are tested with their methods)
LOSS_CONFIGS = ["focal", "class_balanced", "cb_sigmoid", "cb_focal", "ldam", "ldam_drw", "balanced_softmax",
                "logit_adjustment", "seesaw", "softmax_eql", "ghm_c", "label_aware_smoothing",
                "ghm_cwap_ura", "ghm_cwap_aura", "swrm", "grw", "lade", "cdb_ce",
                "cb_softmax_bce", "cyclical_focal"]
CONFIGS = [CONFIG_DIR / f"{name}.yaml" for name in LOSS_CONFIGS]


def test_every_loss_has_a_config():
    from longtail.config import load_config

    used = {load_config(p).loss.name for p in CONFIGS}
    # ride / ncl: the losses of methods ride / ncl, their configs tested in test_ride.py / test_ncl.py
    assert used == set(LOSSES.names()) - {"ce", "ride", "ncl"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_its_loss_with_the_benchmark_budget(path):
    from longtail import class_counts
    from longtail.config import load_config

    cfg = load_config(path)
    base = load_config(path.parent / "ce.yaml")
    assert cfg.data == base.data and cfg.train == base.train and cfg.model.name == base.model.name
    assert cfg.sampler == base.sampler
    # SWRM's config uses its two-stage method, CDB-W-CE's the method that measures the difficulty
    assert cfg.method == base.method or path.stem in ("swrm", "cdb_ce")
    first = path.read_text().splitlines()[0]
    assert first == f"# longtail train configs/cifar10_lt/{path.name} --out runs/cifar10_lt_{path.stem}"
    loss = build_loss(cfg.loss.name, cfg.loss.params, class_counts=class_counts("exp", 10, 5000, 100))
    logits, target = torch.randn(4, 10), torch.tensor([0, 3, 9, 9])
    assert torch.isfinite(loss(logits, target))


# ----------------------------------------------------------------------------- in the trainer


@pytest.mark.parametrize("name, params", [
    ("seesaw", {}),
    ("ghm_c", {"bins": 10}),
    ("softmax_eql", {"lambda_": 0.15}),  # tiny data: counts ~ [40, 25, 16, 10], f_3 ~ 0.11
])
def test_stateful_loss_resume_equals_uninterrupted(tmp_path, monkeypatch, name, params):
    from conftest import full_and_resumed, tiny_arrays, tiny_config
    from longtail.io import safe_torch_load

    cfg = tiny_config(**{"train.epochs": 2, "loss.name": name, "loss.params": params})
    _, _, cut = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(),
                                 evaluate=False)
    cut_state = cut["loss"]
    a = safe_torch_load(tmp_path / "full/checkpoints/last.pt")
    b = safe_torch_load(tmp_path / "cut/checkpoints/last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for key, value in a["loss"].items():
        assert torch.equal(value, b["loss"][key]) if torch.is_tensor(value) else value.keys() == b["loss"][key].keys()
    if name == "seesaw":  # every training image counted once per epoch
        n_train = int(a["loss"]["class_counts"].sum())
        assert int(cut_state["cum_samples"].sum()) == n_train and int(a["loss"]["cum_samples"].sum()) == 2 * n_train
        assert torch.equal(a["loss"]["cum_samples"], 2 * a["loss"]["class_counts"].long())
    if name == "ghm_c":
        assert not torch.equal(cut_state["acc_sum"], a["loss"]["acc_sum"])
    if name == "softmax_eql":
        assert torch.equal(a["loss"]["_extra_state"]["generator"], b["loss"]["_extra_state"]["generator"])


@pytest.mark.parametrize("name", ["class_balanced", "cb_sigmoid", "cb_focal"])
def test_class_balanced_zero_count_class_is_finite(name):
    # n = 0 is clamped to 1 (the official formula gives 1 / 0 and NaN weights for every class)
    loss = build_loss(name, {"beta": 0.9}, class_counts=[5, 0, 5])
    assert torch.allclose(loss.cb_weight, effective_number_weights([5, 1, 5], 0.9))
    logits, _ = _batch()
    assert torch.isfinite(loss(logits, torch.tensor([0, 2, 2, 0, 2, 0])))
