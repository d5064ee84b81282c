"""Host syncs of a training step (issue 21): the CPU detector (engine/host_sync.py) and the audit of
every CIFAR-10-LT config (benchmarks/host_sync_audit.py) against what methods and losses declare.

A step that reads a device value on the host cannot be captured in a CUDA graph. Each config's
steps (the loop's step: batch, training_step, backward, optimiser step, after_step, the loss's
sync_statistics) must sync exactly where its method declares it (`Method.capture_blockers`: the
method's and the loss's `host_syncs`, one-line reasons): a new sync anywhere fails here until it is
removed or declared with its reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import benchmark_script
from longtail.engine.host_sync import HostSyncError, HostSyncs, host_tensor

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [p for p in sorted((REPO / "configs" / "cifar10_lt").glob("*.yaml")) if p.name != "base.yaml"]


def _audit_script():
    return benchmark_script("host_sync_audit")


def test_detector_records_each_kind_and_restores_torch():
    names = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu", "to", "__getitem__",
             "__setitem__", "nonzero", "bincount")
    before = {n: vars(torch.Tensor).get(n) for n in names}
    functions = (torch.where, torch.nonzero, torch.unique, torch.bincount)
    x = torch.tensor([1.0, -2.0, 3.0])
    with HostSyncs() as syncs:
        x.sum().item()
        bool(x.sum() > 0)
        float(x[0])
        int(x[0])
        [0, 1, 2][torch.tensor(1)]
        x.tolist()
        x.numpy()
        x.cpu()
        x.to("cpu")
        x[x > 0]
        x[x < 0] = 0.0
        torch.where(x > 0)
        x.nonzero()
        torch.unique(x)
        torch.bincount(torch.tensor([0, 1]))
        # not syncs: elementwise work, integer indexing, a move to a torch.device, torch.where(c, a, b)
        y = torch.where(x > 0, x, torch.zeros_like(x)) * 2
        y[0], y[torch.tensor([0, 2])]
        x.to(torch.device("cpu"))
    ops = [r.op for r in syncs.records]
    assert ops == ["item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu", "to('cpu')",
                   "x[bool mask]", "x[bool mask] =", "torch.where(cond)", "nonzero", "torch.unique",
                   "torch.bincount"]
    assert all(r.site == "" and r.origin.startswith("test_host_sync.py:") for r in syncs.records)
    assert {n: vars(torch.Tensor).get(n) for n in names} == before
    assert (torch.where, torch.nonzero, torch.unique, torch.bincount) == functions
    assert x.sum().item() == 4.0  # restored (x[x < 0] = 0 above): no record, no error


def test_detector_names_the_src_longtail_site_and_can_raise():
    from longtail.losses.ghm import GHMCLoss

    with HostSyncs(raise_on_sync=True):
        GHMCLoss(class_counts=[3, 2, 1])(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))  # sync-free
    old = torch.Tensor.item
    with pytest.raises(HostSyncError, match=r"host sync: item at .*test_host_sync.py:\d+"):
        with HostSyncs(raise_on_sync=True):
            torch.ones(1).item()
    assert torch.Tensor.item is old
    with HostSyncs() as syncs:
        from longtail.methods.isda import CovarianceEstimator
        CovarianceEstimator(2, 3).update(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
    assert syncs.sites() and all(site.startswith("methods/isda.py:") for site in syncs.sites())


def test_host_marked_tensors_are_not_recorded():
    counts = host_tensor(torch.tensor([3, 1]))
    with HostSyncs() as syncs:
        counts.tolist()
        torch.tensor([1]).tolist()
    assert len(syncs) == 1


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    script = _audit_script()
    runs = script.MC.Runs(tmp_path_factory.mktemp("sync_runs"))
    return lambda config: script.audit(config, runs, steps=2, batch=8)


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_a_config_steps_sync_exactly_where_declared(config, audit):
    """The steps after the first (one-time work aside) sync iff the method declares why."""
    row = audit(config)
    sites = "; ".join(f"{site} ({ops})" for site, ops in row["sites"].items())
    if row["declared"]:
        assert row["sites"], f"{config.name}: declared {row['declared']} but its steps are sync-free: drop it"
    else:
        assert not row["sites"], (f"{config.name} ({row['method']} + {row['loss']}): host syncs per step at {sites}; "
                                  "remove them or declare why in the method's / loss's `host_syncs`")
    assert all(isinstance(r, str) and r and "\n" not in r for r in row["declared"])
