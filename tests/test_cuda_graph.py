"""train.cuda_graph (engine/graphs.py) on the CPU, with benchmarks/cuda_graph_check.py's stand-in
for torch.cuda.make_graphed_callables.

The stand-in keeps the contract a caller of the real function must respect and fails loudly where
the real one would silently compute something else (static output buffers overwritten by every
replay, an error for a replay before the previous replay's backward or for another input shape,
warm-up passes that move BatchNorm statistics). The real graphs are checked on a GPU by the same
script (`--device cuda`, from benchmarks/cuda_check.sh; docs/speed.md, "CUDA graphs").
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from conftest import benchmark_script, tiny_recipe
from longtail.engine import graphs
from longtail.engine.graphs import GraphedForward, unsupported_reason
from longtail.engine.loop import Trainer, TrainForward

REPO = Path(__file__).resolve().parents[1]


def _check_script():
    return benchmark_script("cuda_graph_check")


CHECK = _check_script()
standin = CHECK.standin


def _forward(**over):
    cfg, data, recipe = tiny_recipe(**over)
    return TrainForward(recipe.model), recipe.model


def _batch(n=16):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(n))


def test_unsupported_reasons():
    assert "CUDA device" in unsupported_reason(torch.device("cpu"), distributed=False, compiled=False)
    cuda = torch.device("cuda")
    assert "data-parallel" in unsupported_reason(cuda, distributed=True, compiled=False)
    assert "train.compile" in unsupported_reason(cuda, distributed=False, compiled=True)
    assert unsupported_reason(cuda, distributed=False, compiled=False) is None


def _step(forward, opt, x):
    pooled, logits = forward(x)
    opt.zero_grad(set_to_none=True)
    (logits.square().mean() + pooled.mean()).backward()
    opt.step()
    return logits


def test_replays_follow_the_eager_trajectory_and_the_warmup_leaves_no_trace():
    eager, model = _forward()
    twin, twin_model = _forward()  # the same initialisation (tiny_recipe seeds 0)
    graphed = GraphedForward(eager, batch_size=16, capture=standin)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    twin_opt = torch.optim.SGD(twin_model.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):  # the first pass runs eager, the second is captured and replayed
        graphed.begin_step()
        x = _batch(16) + step
        torch.testing.assert_close(_step(graphed, opt, x), _step(twin, twin_opt, x), rtol=0, atol=0)
    # the capture's warm-up passes did not count: BatchNorm statistics and counters as the eager twin's
    for (name, b), tb in zip(model.named_buffers(), twin_model.buffers()):
        assert torch.equal(b, tb), name
    for p, tp in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, tp)
    assert graphed.counters() == {"captures": 1, "replays": 3, "eager_calls": 1}
    assert graphed.counters() == {"captures": 1, "replays": 0, "eager_calls": 0}  # reset after reading


def _graphed(**kw):
    """A GraphedForward whose capture is done: one eager pass, then the captured one (both backpropagated)."""
    eager, model = _forward()
    graphed = GraphedForward(eager, batch_size=16, capture=standin, **kw)
    for _ in range(2):
        graphed.begin_step()
        graphed(_batch())[1].sum().backward()
    assert graphed.counters() == {"captures": 1, "replays": 1, "eager_calls": 1}
    return graphed, model


def test_outputs_are_not_the_graphs_static_buffers():
    graphed, _ = _graphed()
    graphed.begin_step()
    first = graphed(_batch())[1]
    kept = first.detach().clone()
    first.sum().backward()
    graphed.begin_step()
    graphed(_batch() * 2)[1].sum().backward()
    assert graphed.counters()["replays"] == 2
    assert torch.equal(first.detach(), kept)  # a later replay did not overwrite what a method kept


@pytest.mark.parametrize("case", ["second pass", "no grad", "other batch size", "eval mode", "images need grad",
                                  "declared", "hidden input", "hook added"])
def test_passes_that_cannot_be_replayed_run_eager(case, caplog):
    graphed, model = _graphed()
    x = _batch()
    graphed.begin_step()
    if case == "second pass":  # before the first pass's backward: the stand-in would raise if replayed
        graphed(x)
    elif case == "no grad":
        torch.set_grad_enabled(False)
    elif case == "other batch size":  # the epoch's partial last batch
        x = _batch(5)
    elif case == "eval mode":
        model.eval()
    elif case == "images need grad":
        x.requires_grad_()
    elif case == "declared":  # a model whose pass reads a hidden input says so
        model.graph_capturable = False
    elif case == "hidden input":  # an attribute the forward may read, changed since the capture
        model.features[0].stride = (2, 2)
    else:  # a hook registered after the capture would not run in a replay
        model.fc.register_forward_hook(lambda *a: None)
    try:
        with caplog.at_level(logging.INFO, logger="longtail.engine.graphs"):
            out = graphed(x)
    finally:
        torch.set_grad_enabled(True)
    assert len(out) == 2
    replayed = 1 if case == "second pass" else 0
    assert graphed.counters() == {"captures": 1, "replays": replayed, "eager_calls": 1}
    if case == "hidden input":
        assert "features.0.stride differs from the capture's" in caplog.text
    if case == "hook added":
        assert "fc._forward_hooks (entries added) differs" in caplog.text


def test_a_side_output_of_the_forward_turns_the_graphs_off(caplog):
    eager, model = _forward()
    graphed = GraphedForward(eager, batch_size=16, capture=standin)
    inner = model.forward_features

    def keeping(images):  # an undeclared side output, as LCReg's latent output would be
        out = inner(images)
        model.kept = out
        return out

    model.forward_features = keeping
    with caplog.at_level(logging.WARNING, logger="longtail.engine.graphs"):
        for _ in range(3):
            graphed.begin_step()
            graphed(_batch())[1].sum().backward()
    assert graphed.disabled is not None and "the model's forward sets model.kept" in graphed.disabled
    assert "goes on eager" in caplog.text
    assert graphed.counters() == {"captures": 0, "replays": 0, "eager_calls": 3}


def test_hooks_present_at_the_capture_turn_the_graphs_off(caplog):
    eager, model = _forward()
    seen = []
    model.features[1].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    graphed = GraphedForward(eager, batch_size=16, capture=standin)
    with caplog.at_level(logging.WARNING, logger="longtail.engine.graphs"):
        for _ in range(3):
            graphed.begin_step()
            graphed(_batch())[1].sum().backward()
    assert graphed.disabled == "features.1 has module hooks, which a replay would not run"
    assert len(seen) == 3  # every pass ran eager and called the hook
    assert graphed.counters() == {"captures": 0, "replays": 0, "eager_calls": 3}


def test_a_changed_module_state_is_captured_again_up_to_max_captures(caplog):
    eager, model = _forward()
    graphed = GraphedForward(eager, batch_size=16, capture=standin, max_captures=2)
    # each new state: its first pass eager, then a capture; the third state finds no capture left
    states = [False, False, False, True, True, True, False, False]
    for freeze in states:
        for name, p in model.named_parameters():  # freeze: a stage that trains only the classifier
            p.requires_grad_(not freeze or name.startswith("fc."))
        graphed.begin_step()
        with caplog.at_level(logging.WARNING, logger="longtail.engine.graphs"):
            graphed(_batch())[1].sum().backward()
    assert graphed.captures == 2
    assert graphed.disabled is not None and "changed after 2 captures" in graphed.disabled
    assert "goes on eager" in caplog.text
    # eager: first pass of state 1, of state 2, of state 3 and the pass that found no capture left
    assert graphed.counters() == {"captures": 2, "replays": 4, "eager_calls": 4}


def test_a_failed_capture_goes_eager_with_batchnorm_restored(caplog):
    eager, model = _forward()

    def failing(module, sample, warmup_iters):
        module(sample)  # a warm-up pass ran (BatchNorm statistics moved), then the capture failed
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    graphed = GraphedForward(eager, batch_size=16, capture=failing)
    with caplog.at_level(logging.WARNING, logger="longtail.engine.graphs"):
        for _ in range(2):
            graphed.begin_step()
            graphed(_batch())
    assert "capture failed: operation not permitted when stream is capturing" in caplog.text
    assert graphed.counters() == {"captures": 0, "replays": 0, "eager_calls": 2}
    # two eager passes: num_batches_tracked advanced by exactly two, the warm-up pass undone
    tracked = [b for n, b in model.named_buffers() if n.endswith("num_batches_tracked")]
    assert tracked and all(int(b) == 2 for b in tracked)


def _train(tmp_path, name, **over):
    cfg, data, recipe = tiny_recipe(**over)
    (tmp_path / name).mkdir()
    trainer = Trainer(cfg, data, tmp_path / name, recipe=recipe)
    trainer.run()
    return trainer


@pytest.mark.parametrize("over", [{}, {"loss.name": "ldam", "reweight.scheme": "effective_number", "reweight.start_epoch": 1}],
                         ids=["ce", "ldam_drw"])
def test_a_graphed_run_ends_with_the_eager_runs_weights(tmp_path, monkeypatch, over):
    eager = _train(tmp_path, "eager", **over)
    monkeypatch.setattr(graphs, "unsupported_reason", lambda *a, **k: None)
    monkeypatch.setattr(graphs, "_make_graphed", standin)
    graphed = _train(tmp_path, "graphed", **{"train.cuda_graph": True, **over})
    assert graphed.graph is not None
    for (name, a), b in zip(eager.model.state_dict().items(), graphed.model.state_dict().values()):
        assert torch.equal(a, b), name
    rows = graphed.rundir.read_metrics()
    steps = -(-len(graphed.sampler) // 16)
    partial = len(graphed.sampler) % 16 != 0
    assert partial  # the tiny split ends each epoch with a partial batch, which runs eager
    # epoch 1: the first pass eager, then replays, the partial batch eager; epoch 2: replays, partial eager
    assert [r["graph_replays"] for r in rows] == [steps - 2, steps - 1]
    assert [r["graph_eager_calls"] for r in rows] == [2, 1]
    assert rows[-1]["graph_captures"] == 1


def test_on_the_cpu_the_run_says_why_it_trains_eager(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="longtail.engine.loop"):
        trainer = _train(tmp_path, "cpu", **{"train.cuda_graph": True, "train.epochs": 1})
    assert trainer.graph is None
    assert "train.cuda_graph is set but this run trains eager: CUDA graphs need a CUDA device" in caplog.text


# methods with hidden inputs or side outputs (RSG's hook, BBN's mixing weight, LCReg's latent output),
# stateful losses (GHM-CWAP, SWRM), DRW and a two-view method: eager against graphed, bitwise
SUBSET = ["ldam_drw", "ghm_cwap_ura", "swrm", "rsg", "bbn", "lcreg_stage1", "paco"]


def test_graphed_steps_equal_eager_steps_for_every_kind_of_method(tmp_path):
    configs = [REPO / "configs" / "cifar10_lt" / f"{name}.yaml" for name in SUBSET]
    rows, skipped = CHECK.check_all(configs, device="cpu", standin_capture=True, steps=3, workdir=tmp_path)
    assert not skipped, skipped
    by = {Path(r["config"]).stem: r for r in rows}
    assert all(r["equal"] for r in rows), [(k, r["max_abs_diff"], r["worst"]) for k, r in by.items() if not r["equal"]]
    for name in ("ldam_drw", "ghm_cwap_ura", "swrm", "paco"):  # the first step eager, then one replay per step
        assert by[name]["replays"] == pytest.approx(2 / 3), name
    for name in ("rsg", "bbn", "lcreg_stage1"):  # declared hidden inputs / side outputs: every pass eager
        assert by[name]["replays"] == 0 and by[name]["disabled"] is None, name
