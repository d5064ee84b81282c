"""The standard recipe: one stage, any model, loss, sampler and re-weighting schedule.

Re-weighting (`reweight` config section) follows LDAM-DRW's `cifar_train.py`: from
0-idx epoch `start_epoch` on, the loss gets per-class weights (effective number with
`beta`, or inverse frequency), normalised to sum C; before that it is unweighted.
start_epoch = 0 is RW; a later epoch (the first LR decay) is DRW. Re-sampling (RS) is a
sampler (`resample`), used for real by the loop.
"""

from __future__ import annotations

from ..registry import METHODS
from .base import Method


@METHODS.register("standard")
class Standard(Method):
    """One-stage training with the configured model, loss, sampler and re-weighting."""

    def __init__(self, *, cfg, data):
        super().__init__(cfg=cfg, data=data)

    def plain_ce_epochs(self) -> float:
        """Unweighted `ce` without mixup is plain CE until re-weighting starts (DRW's switch)."""
        c = self.cfg
        if c.loss.name != "ce" or c.loss.params or c.train.mixup_alpha > 0:
            return 0
        return self._unweighted_epochs()
