"""Weight constraints a training run may switch on: MaxNorm via projected gradient descent.

The config section `constraint` (`name`: none | max_norm, `params`) names one; the method
contract (methods/base.py) builds it once per run, right after the model, and projects in its
default `after_step` (after every optimiser step) or `on_epoch_end` (after each epoch's steps,
before validation and the checkpoint), so every method gets it, stage-2 ones included.

MaxNorm (Alshammari, Wang, Ramanan, Kong, "Long-Tailed Recognition via Weight Balancing",
CVPR 2022, Sec. 3.3 / Eq. 5): each per-class (per-output-unit) weight vector w_k of a
constrained layer is kept inside the L_p ball of radius r_l of its layer l by projection,

    w_k <- w_k * min(1, r_l / ||w_k||_p)

(a vector already inside the ball is unchanged; one outside is scaled onto its surface).
Official code (ShadeAlsha/LTR-weight-balancing @ e89f292, `utils/regularizers.py`,
`MaxNorm_via_PGD`, and `utils/trainval.py`), whose readings are the defaults here:

- the norm of a parameter of shape (K, ...) is taken per row k over all remaining dims
  (the tensor reshaped to (K, -1)), `torch.linalg.norm(ord=p, dim=1)`, p = 2 (`LpNorm`);
- only the classifier's weight is constrained (`model.encoder.fc.weight`; its bias is listed
  but gets an infinite threshold, so it never moves): `layers: head`, every parameter of
  `model.head` with two or more dims. `layers: all` constrains every weight with two or more
  dims (convolutions per output filter, linear layers per output unit), one radius per layer;
- the radius is *relative* (`setPerLayerThresh`, called once on the weights training starts
  from, i.e. the stage-1 classifier): r_l = min_k ||w_k|| + thresh * (max_k ||w_k|| - min_k ||w_k||)
  with thresh = 0.1. `mode: absolute` reads `thresh` as the radius itself;
- the projection runs once per epoch, after the epoch's last step (`train_model` calls
  `pgdFunc.PGD(model)` after the training phase, not after each step): `every: epoch`.
  `every: step` projects after every optimiser step (the textbook PGD reading);
- `MaxNorm_via_PGD` has an exponent `tau` (default 1, never changed in the demos); at tau = 1
  it is the projection above, other values are not offered.

The radii are computed from the model as `build` returns it (stage-1 weights, or the seeded
initialisation), so a resumed run recomputes exactly the same radii.
"""

from __future__ import annotations

import math

import torch

from ..errors import did_you_mean
from ..losses._checks import choice, number

CONSTRAINT_NAMES = ("none", "max_norm")
MODES = ("relative", "absolute")
LAYERS = ("head", "all")
EVERY = ("epoch", "step")


def row_norms(weight: torch.Tensor, p: float) -> torch.Tensor:
    """(K,) L_p norms of the rows of `weight` (K, ...) flattened to (K, -1)."""
    return torch.linalg.vector_norm(weight.detach().reshape(weight.shape[0], -1), ord=p, dim=1)


def project_rows(weight: torch.Tensor, radius: float, p: float) -> None:
    """In place: every row of `weight` whose L_p norm exceeds `radius` is scaled to norm `radius`."""
    with torch.no_grad():
        norms = row_norms(weight, p)
        scale = torch.where(norms > radius, radius / norms.clamp_min(torch.finfo(norms.dtype).tiny),
                            torch.ones_like(norms))
        weight.mul_(scale.reshape(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))


class MaxNorm:
    """Per-layer MaxNorm projection (Alshammari et al., CVPR 2022; official `MaxNorm_via_PGD`).

    Keyword-only, validated parameters: `thresh` (0.1; relative: the fraction of the way from the
    smallest to the largest initial row norm, in [0, 1]; absolute: the radius, > 0), `p` (2: the
    norm's order, >= 1 or inf), `mode` (relative | absolute), `layers` (head | all), `every`
    (epoch | step). Built with the model whose current weights fix the relative radii.
    """

    def __init__(self, model: torch.nn.Module, *, thresh: float = 0.1, p: float = 2.0, mode: str = "relative",
                 layers: str = "head", every: str = "epoch"):
        self.mode = choice("mode", mode, MODES)
        self.layers = choice("layers", layers, LAYERS)
        self.every = choice("every", every, EVERY)
        if not isinstance(p, (int, float)) or isinstance(p, bool) or math.isnan(p) or p < 1:
            raise ValueError(f"p must be a number >= 1 (or .inf), got {p!r}")
        self.p = float(p)
        if self.mode == "relative":
            self.thresh = number("thresh", thresh, low=0.0)
            if self.thresh > 1:
                raise ValueError(f"thresh must be in [0, 1] with mode relative, got {thresh!r}")
        else:
            self.thresh = number("thresh", thresh, low=0.0, low_open=True)
        names = self.constrained_names(model)
        if not names:
            raise ValueError(f"layers '{self.layers}' selects no weight with two or more dims in "
                             f"{type(model).__name__}")
        params = dict(model.named_parameters())
        self.radii: dict[str, float] = {}
        for name in names:
            if self.mode == "absolute":
                self.radii[name] = self.thresh
            else:
                norms = row_norms(params[name], self.p)
                lo, hi = float(norms.min()), float(norms.max())
                self.radii[name] = lo + self.thresh * (hi - lo)

    def constrained_names(self, model: torch.nn.Module) -> list[str]:
        """Names (model.named_parameters) of the constrained weights: >= 2 dims, in the head or anywhere."""
        if self.layers == "head":
            head = getattr(model, "head", None)
            if head is None:
                raise ValueError("layers 'head' needs a model with a `head` module")
            ids = {id(p) for p in head.parameters()}
        return [n for n, q in model.named_parameters()
                if q.dim() >= 2 and (self.layers == "all" or id(q) in ids)]

    def project(self, model: torch.nn.Module) -> None:
        """Project every constrained weight of `model` onto its layer's ball (in place, no grad)."""
        params = dict(model.named_parameters())
        for name, radius in self.radii.items():
            project_rows(params[name], radius, self.p)

    def state(self) -> dict:
        return {"radii": dict(self.radii), "p": self.p, "every": self.every}


def build_constraint(name: str, params: dict | None, model: torch.nn.Module) -> MaxNorm | None:
    """The configured constraint over `model`'s current weights, or None for 'none'. A bad
    parameter raises ValueError naming it (the method builder makes it a one-line ConfigError)."""
    params = dict(params or {})
    if name == "none":
        if params:
            raise ValueError(f"takes no params, got {', '.join(sorted(params))}")
        return None
    if name == "max_norm":
        known = ("thresh", "p", "mode", "layers", "every")
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"max_norm has no parameter '{unknown[0]}'{did_you_mean(unknown[0], known)} "
                             f"(known: {', '.join(known)})")
        return MaxNorm(model, **params)
    raise ValueError(f"unknown constraint '{name}'; known: {', '.join(CONSTRAINT_NAMES)}")


__all__ = ["CONSTRAINT_NAMES", "MaxNorm", "build_constraint", "project_rows", "row_norms"]
