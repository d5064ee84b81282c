"""Category similarity (SWRM, seed 001): windows, Eq. 2, Eq. 3, t-SNE order, the head-to-tail
table, and `longtail similarity` on a tiny digits run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_config
from longtail.cli import main
from longtail.config import config_from_dict
from longtail.errors import CheckpointError, ConfigError
from longtail.runs import train_run
from longtail.similarity.command import analyse_run
from longtail.similarity.confusion import compare_errors, format_table, head_to_tail_errors, tail_classes
from longtail.similarity.projection import default_perplexity, prototypes_from_features, tsne_projection
from longtail.similarity.windows import (class_order, cosine_similarity_from_prototypes, projection_similarity,
                                         swm_margins, swr_weights, weights_and_margins, window_mask, window_members)

# the hand-worked example: 5 classes, counts n, projection p (min 0, max 1, so p~ = p)
N = [100, 50, 20, 10, 5]
P = [0.0, 0.5, 0.1, 1.0, 0.3]
# order by p: classes 0 (0.0), 2 (0.1), 4 (0.3), 1 (0.5), 3 (1.0); W = 3, 'shift':
# position 0 -> positions 0..2 (shifted in), 1 -> 0..2, 2 -> 1..3, 3 -> 2..4, 4 -> 2..4 (shifted in)
WINDOWS_W3 = {0: [0, 2, 4], 2: [0, 2, 4], 4: [2, 4, 1], 1: [4, 1, 3], 3: [4, 1, 3]}


def test_order_and_windows_of_the_example():
    order = class_order(P)
    assert order.tolist() == [0, 2, 4, 1, 3]
    members = window_members(order, 3, "shift")
    assert {c: members[c] for c in range(5)} == WINDOWS_W3
    mask = window_mask(order, 3)
    assert mask.sum(1).tolist() == [3] * 5 and all(mask[c, c] for c in range(5))


def test_eq2_swr_weights_by_hand():
    # w_c = log(1 + n_max / n_c * mean_{i in win(c)} n_i / n_c)
    expected = [
        math.log(1 + 100 / 100 * (100 + 20 + 5) / 100 / 3),  # class 0: window {0, 2, 4} = 17/12
        math.log(1 + 100 / 50 * (5 + 50 + 10) / 50 / 3),  # class 1: {4, 1, 3} = 28/15
        math.log(1 + 100 / 20 * (100 + 20 + 5) / 20 / 3),  # class 2: {0, 2, 4} = 685/60
        math.log(1 + 100 / 10 * (5 + 50 + 10) / 10 / 3),  # class 3: {4, 1, 3} = 680/30
        math.log(1 + 100 / 5 * (20 + 5 + 50) / 5 / 3),  # class 4: {2, 4, 1} = 101
    ]
    w = swr_weights(N, window_mask(class_order(P), 3))
    assert w.dtype == torch.float64
    assert w.tolist() == pytest.approx(expected, rel=1e-12)
    assert w.tolist() == pytest.approx([0.348307, 0.624154, 2.435074, 3.120895, 4.615121], abs=1e-6)


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_eq3_swm_margins_by_hand(beta):
    # sim(i, c) = exp(-|p_i - p_c|), so sim^-beta = exp(beta |p_i - p_c|); m_c = log(mean over the window)
    e = lambda d: math.exp(beta * d)  # noqa: E731
    expected = [
        math.log((1 + e(0.1) + e(0.3)) / 3),  # class 0 (p 0.0): 0, 0.1, 0.3
        math.log((e(0.2) + 1 + e(0.5)) / 3),  # class 1 (p 0.5): window 4, 1, 3 -> 0.2, 0, 0.5
        math.log((e(0.1) + 1 + e(0.2)) / 3),  # class 2 (p 0.1): 0, 2, 4 -> 0.1, 0, 0.2
        math.log((e(0.7) + e(0.5) + 1) / 3),  # class 3 (p 1.0): 4, 1, 3 -> 0.7, 0.5, 0
        math.log((e(0.2) + 1 + e(0.2)) / 3),  # class 4 (p 0.3): 2, 4, 1 -> 0.2, 0, 0.2
    ]
    p = torch.tensor(P, dtype=torch.float64)
    m = swm_margins(projection_similarity(p), window_mask(class_order(p), 3), beta)
    assert m.tolist() == pytest.approx(expected, rel=1e-12)
    w2, m2, order = weights_and_margins(p, N, window=3, beta=beta)
    assert torch.allclose(m2, m) and order.tolist() == [0, 2, 4, 1, 3]
    if beta == 1.0:
        assert m.tolist() == pytest.approx([0.141219, 0.254674, 0.103331, 0.440934, 0.137674], abs=1e-6)


def test_windows_at_both_ends():
    order = np.arange(5)  # projection order = class order
    # W = 3: shift keeps three members at the ends, truncate drops the missing position
    assert window_members(order, 3, "shift") == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [2, 3, 4]]
    assert window_members(order, 3, "truncate") == [[0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4]]
    # W = 4 (even): positions k-2 .. k+1, one more before than after
    assert window_members(order, 4, "shift") == [[0, 1, 2, 3]] * 3 + [[1, 2, 3, 4]] * 2
    assert window_members(order, 4, "truncate") == [[0, 1], [0, 1, 2], [0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4]]
    # truncate averages over the members present: class 3 of the example sits last, window {1, 3}
    p = torch.tensor(P, dtype=torch.float64)
    w, m, _ = weights_and_margins(p, N, window=3, beta=1.0, edge="truncate")
    assert w[3].item() == pytest.approx(math.log(1 + 10 * (50 + 10) / 10 / 2))
    assert m[3].item() == pytest.approx(math.log((math.exp(0.5) + 1) / 2))
    assert w[0].item() == pytest.approx(math.log(1 + (100 + 20) / 100 / 2))  # first: window {0, 2}


def test_window_larger_than_the_number_of_classes():
    p = torch.tensor(P, dtype=torch.float64)
    # shift: W is clamped to C, every window holds all classes
    assert window_members(class_order(p), 7, "shift") == [[0, 2, 4, 1, 3]] * 5
    w, m, _ = weights_and_margins(p, N, window=7, beta=1.0)
    w5, m5, _ = weights_and_margins(p, N, window=5, beta=1.0)
    assert torch.equal(w, w5) and torch.equal(m, m5)
    # truncate: the centred range k-3 .. k+3 is clipped to the order (all classes from W = 2C - 1 = 9)
    assert window_members(np.arange(5), 7, "truncate") == [[0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4],
                                                           [0, 1, 2, 3, 4], [1, 2, 3, 4]]
    assert window_members(np.arange(5), 9, "truncate") == [[0, 1, 2, 3, 4]] * 5
    # every window is all classes: w_c = log(1 + n_max / n_c * mean(n) / n_c)
    assert w.tolist() == pytest.approx([math.log(1 + 100 / n * 37 / n) for n in N])
    # W = 1: only the class itself, so no margin and the global term alone
    w1, m1, _ = weights_and_margins(p, N, window=1, beta=3.0)
    assert m1.abs().max().item() < 1e-12 and w1.tolist() == pytest.approx([math.log(1 + 100 / n) for n in N])


def test_bad_window_inputs():
    with pytest.raises(ConfigError, match="window must be an integer >= 1"):
        window_mask(np.arange(3), 0)
    with pytest.raises(ConfigError, match="edge must be one of"):
        window_mask(np.arange(3), 2, "wrap")
    with pytest.raises(ConfigError, match="at least one training image per class"):
        swr_weights([5, 0, 1], window_mask(np.arange(3), 2))


def test_similarity_definitions():
    p = torch.tensor([3.0, -1.0, 7.0], dtype=torch.float64)
    sim = projection_similarity(p)  # p~ = (p + 1) / 8 = [0.5, 0, 1]
    assert torch.allclose(sim, torch.exp(-torch.tensor([[0, .5, .5], [.5, 0, 1], [.5, 1, 0]], dtype=torch.float64)))
    assert torch.allclose(projection_similarity(10 * p + 4), sim)  # scale and shift do not matter
    assert torch.equal(projection_similarity(torch.zeros(3)), torch.ones(3, 3))
    cos = cosine_similarity_from_prototypes(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    c = 1 / math.sqrt(2)
    expected = np.exp(np.array([[1, 0, c], [0, 1, c], [c, c, 1]]) - 1)
    assert np.allclose(cos.numpy(), expected)
    with pytest.raises(ConfigError, match="finite prototype"):
        cosine_similarity_from_prototypes(np.array([[1.0, 0.0], [np.nan, np.nan]]))


def test_margins_gradcheck_in_the_projection():
    mask = window_mask(class_order(P), 3)
    p = torch.tensor([0.05, 0.52, 0.11, 0.93, 0.31], dtype=torch.float64, requires_grad=True)  # same order
    assert torch.autograd.gradcheck(lambda v: swm_margins(projection_similarity(v), mask, 1.5), (p,))


def test_tsne_keeps_clusters_together_and_is_seeded():
    rs = np.random.RandomState(0)
    centre = {0: 0.0, 2: 0.0, 4: 0.0, 1: 10.0, 3: 10.0, 5: 10.0}
    protos = np.stack([centre[c] + 0.3 * rs.randn(5) for c in range(6)])
    proj = tsne_projection(protos, seed=0)
    order = class_order(proj).tolist()
    assert set(order[:3]) in ({0, 2, 4}, {1, 3, 5})
    assert np.array_equal(proj, tsne_projection(protos, seed=0))
    assert default_perplexity(10) == 3.0 and default_perplexity(200) == 30.0 and default_perplexity(2) == 1.0
    with pytest.raises(ConfigError, match="perplexity must be in"):
        tsne_projection(protos, perplexity=6)
    feats = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert np.allclose(prototypes_from_features(feats, np.array([0, 0, 1]), 2), [[2.0, 3.0], [5.0, 6.0]])
    with pytest.raises(ConfigError, match="without training images"):
        prototypes_from_features(feats, np.array([0, 0, 1]), 3)


def test_head_to_tail_table_by_hand():
    names = ["a", "b", "c", "d"]
    counts = [100, 40, 10, 5]
    # rows: true class; test images per class 10
    cm = np.array([[9, 1, 0, 0],
                   [2, 8, 0, 0],
                   [3, 4, 2, 1],   # c (10): predicted as b 40 %, a 30 %; d is rarer, not a head
                   [5, 0, 2, 3]])  # d (5): a 50 %, c 20 % (10 >= 2 * 5: c is a head of d)
    assert tail_classes(counts, 0.5).tolist() == [3, 2]
    rows = head_to_tail_errors(cm, counts, names, top=2)
    assert [(r["tail"], r["head"], r["error"]) for r in rows] == [("d", "a", 50.0), ("d", "c", 20.0),
                                                                 ("c", "b", 40.0), ("c", "a", 30.0)]
    assert rows[0]["predicted_as"] == 5 and rows[0]["test_images"] == 10
    assert [r["head"] for r in head_to_tail_errors(cm, counts, names, min_ratio=3.0, top=5)] == ["a", "b", "a"]
    other = cm.copy()
    other[3] = [2, 0, 1, 7]
    rows2 = compare_errors(rows, other, "swrm")
    assert rows2[0]["error_swrm"] == 20.0 and rows2[0]["change_swrm"] == -30.0
    text = format_table(rows2, compare=["swrm"])
    assert "d (5)" in text and "a (100)" in text and "20.0 (-30.0)" in text
    with pytest.raises(ConfigError, match="tail_fraction"):
        tail_classes(counts, 0.0)


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    cfg = tiny_config(**{"data": {"source": "digits", "imbalance_ratio": 5, "test_per_class": 10}, "train.epochs": 1})
    run = tmp_path_factory.mktemp("sim") / "run"
    train_run(config_from_dict(cfg), run)
    return run


def _tree(folder):
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_similarity_command_with_out_leaves_the_run_untouched(digits_run, tmp_path, capsys, caplog):
    before = _tree(digits_run)
    out = tmp_path / "sim"
    assert main(["similarity", str(digits_run), "--out", str(out), "--window", "3", "--compare", str(digits_run)]) == 0
    assert _tree(digits_run) == before
    printed = capsys.readouterr().out
    assert "confusable head-to-tail pairs" in printed and "SWR w" in printed
    result = json.loads((out / "similarity.json").read_text())
    assert result["settings"]["window"] == 3 and len(result["order"]) == 10
    assert sorted(result["order"]) == sorted(result["class_names"])
    # the saved numbers are Eq. 2 / Eq. 3 of the saved projection and counts
    w, m, order = weights_and_margins(torch.tensor(result["projection"], dtype=torch.float64),
                                      result["class_counts"], window=3, beta=1.0)
    assert np.allclose(result["swr_weights"], w.numpy()) and np.allclose(result["swm_margins"], m.numpy())
    assert [result["class_names"][i] for i in order] == result["order"]
    rows = json.loads((out / "confusable.json").read_text())
    assert rows == result["confusable"] and all(r["change_run"] == 0 for r in rows)  # compared with itself
    assert (out / "confusable.csv").read_text().splitlines()[0].startswith("tail,tail_index,tail_count,head")
    assert len((out / "classes.csv").read_text().splitlines()) == 11
    assert (out / "weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "features" / "last.npz").is_file()  # the cache went to --out
    # a second call reads that cache (no feature extraction)
    caplog.clear()  # the command's own lines above
    with caplog.at_level("INFO", logger="longtail"):
        analyse_run(digits_run, out=out, window=3)
    assert not any(m.startswith("features:") for m in caplog.messages)


def test_similarity_command_default_folder_and_errors(digits_run, tmp_path, capsys):
    result = analyse_run(digits_run, similarity="cosine", edge="truncate")
    assert result["out"] == str(digits_run / "similarity") and (digits_run / "similarity" / "weights.png").is_file()
    assert result["settings"]["effective_window"] == 10  # default W = 15 > C = 10: one window of every class
    assert min(min(row) for row in result["similarity"]) >= math.exp(-2) - 1e-9
    assert main(["similarity", str(tmp_path / "nope"), "--out", str(tmp_path / "o1")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError):
        analyse_run(tmp_path / "empty", out=tmp_path / "o2")
    with pytest.raises(CheckpointError, match="predictions.npz"):
        analyse_run(digits_run, out=tmp_path / "o3", compare=[str(tmp_path / "empty")])
    with pytest.raises(ConfigError, match="window must be"):
        analyse_run(digits_run, out=tmp_path / "o4", window=0)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
