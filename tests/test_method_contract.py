"""Contract tests over every registered method, like the ones over losses and samplers.

Each method builds its recipe once from a config (model, loss, sampler, parameter groups),
runs one training step through the hooks the loop calls (or its post-hoc fit), round-trips
its state, and rebuilds its network from a checkpoint dict and the run's DataInfo alone (no
images, and for a stage-2 method no stage-1 file). A new method needs an entry in SETUP only
if the defaults of tiny_config cannot build it; a registered method missing from the run
fails the test.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_arrays, tiny_config
from longtail.config import config_from_dict
from longtail.data.build import build_data
from longtail.methods import Recipe, StepResult, build_recipe, rebuild_model
from longtail.optim import ParamGroup, build_optimizer
from longtail.registry import METHODS
from longtail.runs import train_run

RIDE_NET = {"model.name": "resnet20", "model.head": "cosine",
            "model.params": {"experts": {"num": 2, "shared_stages": 1, "widths": "ride", "scale": 30.0}}}
# config overrides a method needs beyond tiny_config's defaults ("STAGE1" is replaced by a stage-1 checkpoint)
SETUP = {
    "crt": {"method.params": {"stage1": "STAGE1"}, "sampler.name": "class_aware"},
    "lws": {"method.params": {"stage1": "STAGE1"}},
    "tau_norm": {"method.params": {"stage1": "STAGE1"}, "data.val_per_class": 2},
    "ncm": {"method.params": {"stage1": "STAGE1"}},
    "mislas": {"method.params": {"stage1": "STAGE1"}, "loss.name": "label_aware_smoothing"},
    "swrm": {"loss.name": "swrm", "loss.params": {"window": 2}, "method.params": {"start_epoch": 0}},
    "dyswrm": {"loss.name": "swrm", "loss.params": {"window": 2}, "method.params": {"start_epoch": 0}},
    "lcreg": {"method.params": {"num_latents": 3}},
    "ib": {"method.params": {"start_epoch": 0}}, "ib_focal": {"method.params": {"start_epoch": 0}},  # the IB step itself
    "cdb_ce": {"data.val_per_class": 2, "loss.name": "cdb_ce"},
    "disalign": {"method.params": {"stage1": "STAGE1"}, "loss.name": "grw"},
    "dro_lt": {"method.params": {"stage1": "STAGE1"}}, "dro_lt_classifier": {"method.params": {"stage1": "STAGE1"}},
    "weight_balancing": {"method.params": {"stage1": "STAGE1"}, "loss.name": "cb_softmax_bce", "constraint": {"name": "max_norm"}},
    "bbn": {"model.name": "resnet20", "model.params": {"bbn": True}},  # BBN's two-branch network
    "ride": {**RIDE_NET, "loss.name": "ride"},  # RIDE's expert network
    "m2m": {"method.params": {"classifier": "STAGE1", "start_epoch": 0}},  # g: the CE stage-1 run; generating
    "metasaug": {"data.val_per_class": 2, "method.params": {"start_epoch": 0}},  # meta set; the meta step itself
    "cmo": {"train.cutmix_alpha": 1.0, "method.params": {"start_data_aug": -1, "end_data_aug": 0}},  # CutMix pastes its batch
    "rsg": {"model.name": "resnet20", "model.params": {"rsg": True, "rsg_centers": 3, "rsg_dim": 8},
            "method.params": {"head_ratio": 0.5, "epoch_thresh": -1}},  # RSG's module on a CIFAR ResNet
    "oltr": {"method.params": {"stage1": "STAGE1"}, "sampler.name": "class_aware"},
    "fslwf": {"method.params": {"stage1": "STAGE1"}},
    "sade": {"model.name": "resnet20", "model.head": "cosine",  # three experts (models/experts.py)
             "model.params": {"experts": {"num": 3, "widths": "ride", "scale": 30}}},
    "lfme": {"data.val_per_class": 2, "method.params": {"experts": "STAGE1"}},  # one full-data expert: the CE run
    "ncl": {"model.name": "resnet20", "loss.name": "ncl", "loss.params": {"hard_classes": 2},  # independent experts
            "model.params": {"experts": {"num": 2, "shared_stages": "none"}}},
    "ride_router": {"method.params": {"stage1": "STAGE1", "top_k": 2}, **RIDE_NET},  # on a `ride` stage 1
}
STAGE1_OF = {"ride_router": "ride"}  # stage-2 methods whose stage 1 is not the plain CE run: its SETUP


@pytest.fixture(scope="module")
def stage1_runs(tmp_path_factory):
    """Stage-1 checkpoints by stage-1 method name, trained (1 epoch) when first asked for."""
    root, made = tmp_path_factory.mktemp("contract_stage1"), {}

    def get(method: str = "standard"):
        if method not in made:
            over = {"train.epochs": 1, **({"method.name": method, **SETUP.get(method, {})} if method != "standard" else {})}
            train_run(config_from_dict(tiny_config(**over)), root / method, arrays=tiny_arrays(), evaluate=False)
            made[method] = root / method / "checkpoints" / "last.pt"
        return made[method]
    return get


def _config(name: str, stage1_path) -> dict:
    over = {"method.name": name}
    for key, value in SETUP.get(name, {}).items():
        if isinstance(value, dict):
            value = {k: (str(stage1_path) if v == "STAGE1" else v) for k, v in value.items()}
        over[key] = value
    return tiny_config(**over)


def test_every_registered_method_is_exercised():
    assert set(METHODS.names()) >= set(SETUP), "SETUP names a method that is not registered"
    assert len(METHODS.names()) >= 11


@pytest.mark.parametrize("name", METHODS.names())
def test_recipe_step_state_and_rebuild(name, stage1_runs, tmp_path):
    stage1 = stage1_runs(STAGE1_OF.get(name, "standard"))
    cfg = config_from_dict(_config(name, stage1))
    data = build_data(cfg.data, arrays=tiny_arrays())
    torch.manual_seed(0)
    recipe = build_recipe(cfg, data)
    method = recipe.method
    assert isinstance(recipe, Recipe) and recipe.model is not None
    assert method.stage in (1, 2) and isinstance(method.trains, bool)
    assert (method.stage == 2) == ("stage1" in cfg.method.params)
    if method.trains:
        assert recipe.loss is not None and recipe.sampler is not None and recipe.param_groups
        assert all(isinstance(g, ParamGroup) for g in recipe.param_groups)
        params = [p for g in recipe.param_groups for p in g.params]
        assert params and all(p.requires_grad for p in params)
        assert len({id(p) for p in params}) == len(params), "a parameter in two groups"
        opt = build_optimizer("sgd", recipe.param_groups, lr=0.01, weight_decay=1e-4, params={"momentum": 0.9})
        method.on_epoch_start(0, recipe.loss)
        method.set_train_mode(recipe.model)
        model = recipe.model

        def forward(images):
            pooled = model.forward_head(model.forward_features(images), pre_logits=True)
            return pooled, model.head(pooled)

        pos = recipe.sampler.indices(0)[:8]
        images = torch.from_numpy(data.train.batch(pos)).permute(0, 3, 1, 2).float() / 255
        target = torch.from_numpy(data.train.labels[pos])
        out = method.training_step(model, forward, images, target, recipe.loss, torch.Generator().manual_seed(0))
        assert isinstance(out, StepResult)
        assert out.loss.dim() == 0 and math.isfinite(float(out.loss.detach()))
        assert out.logits.shape[0] == out.target.shape[0] == len(pos)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    else:
        info = method.fit_posthoc(recipe.model, torch.device("cpu"))
        assert isinstance(info, dict)
    state = method.state_dict()
    assert isinstance(state, dict)
    method.load_state_dict(state)
    # rebuilt from a checkpoint dict and the DataInfo alone: same weights, same outputs
    checkpoint = {"model": recipe.model.state_dict(), "method": state}
    if method.stage == 2:
        moved = tmp_path / "gone.pt"
        stage1.rename(moved)  # the stage-1 file must not be needed
        try:
            rebuilt = rebuild_model(cfg, data.info, checkpoint)
        finally:
            moved.rename(stage1)
    else:
        rebuilt = rebuild_model(cfg, data.info, checkpoint)
    a, b = recipe.model.state_dict(), rebuilt.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loop_calls_after_step_and_on_epoch_end_in_order(tmp_path):
    """The loop calls `after_step` after every optimiser step (the weights already updated) and
    `on_epoch_end` once per epoch after its steps and before that epoch's checkpoint."""
    from longtail.engine.loop import fit
    from longtail.methods.standard import Standard

    cfg = config_from_dict(tiny_config(**{"data.val_per_class": 2}))
    data = build_data(cfg.data, arrays=tiny_arrays())
    calls = []

    class Probe(Standard):
        def training_step(self, model, forward, images, target, loss, generator):
            self.before = [p.detach().clone() for p in model.parameters()]
            calls.append("step")
            return super().training_step(model, forward, images, target, loss, generator)

        def after_step(self, model):
            changed = any(not torch.equal(a, p) for a, p in zip(self.before, model.parameters()))
            calls.append("after_step" if changed else "after_step_before_update")

        def on_epoch_end(self, epoch, model, device):
            calls.append(f"epoch_end{epoch}")

        def state_dict(self):
            calls.append("save")
            return {}

    torch.manual_seed(0)
    recipe = build_recipe(cfg, data)
    method = Probe(cfg=cfg, data=data)
    recipe = Recipe(method=method, model=recipe.model, loss=recipe.loss, sampler=recipe.sampler,
                    param_groups=recipe.param_groups)
    fit(cfg, data, tmp_path / "run", recipe=recipe)
    steps = len(recipe.sampler)
    batches = math.ceil(steps / cfg.train.batch_size)
    one_epoch = ["step", "after_step"] * batches
    assert calls == one_epoch + ["epoch_end0", "save"] + one_epoch + ["epoch_end1", "save"]


@pytest.mark.parametrize("hook", ["after_step", "on_epoch_end"])
def test_overridden_loop_hooks_keep_the_default_behaviour(hook):
    """A method that overrides after_step / on_epoch_end calls the default too: that is where a
    configured weight constraint (MaxNorm, `constraint` section) projects, for every method."""
    import inspect

    for name in METHODS.names():
        cls = METHODS.get(name)
        for klass in cls.__mro__:
            if hook in vars(klass) and klass.__module__ != "longtail.methods.base":
                source = inspect.getsource(vars(klass)[hook])
                assert f"super().{hook}(" in source, f"{klass.__name__}.{hook} does not call super().{hook}(...)"
