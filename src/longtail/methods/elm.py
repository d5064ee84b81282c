"""ELM: Embedding and Logit Margins (Jitkrittum, Menon, Rawat and Kumar, arXiv 2204.13208, 2022).

    L_ELM = L_LM(logits, y) + lambda * L_EM(embeddings, y)

* L_LM, the logit-margin loss, is the configured loss (`loss.name`): the configs use
  `logit_adjustment` with tau = 1 (Menon et al. 2021, pairwise margins tau log(pi_y'/pi_y)),
  `ldam` is the other logit margin the paper discusses. Any registered loss works.
* L_EM, the embedding-margin loss (losses/embedding_margin.py), is a supervised contrastive
  loss over the batch's L2-normalised pooled embeddings (the (B, D) features the head reads),
  with a class-dependent margin rho_y on the positive pairs of an anchor of class y:
  rho_y = embed_max_m * n_y^(-1/4) / max_k n_k^(-1/4) (LDAM-shaped: the rarest class gets
  embed_max_m), temperature T.

No official code is public; readings chosen (each a parameter where two are plausible):
the embeddings are the pooled backbone features (no projection head, so prediction is the
plain linear head's argmax and the network is the standard one); one view per image (no
extra augmentation); anchors without a positive in the batch are left out; under torchrun
L_EM is computed over each rank's shard of the batch (DDP averages the gradients), so a
multi-process run differs from a single-process one in that term; mixup is not supported.
Defaults (lambda 1, T 0.1, embed_max_m 0.5, denominator 'positive_and_negatives') are this
project's choice, not numbers read from the paper.

Method state: none (the margins are fixed by the class counts).
"""

from __future__ import annotations

import torch

from ..losses import Loss
from ..losses._checks import choice, number
from ..losses.embedding_margin import DENOMINATORS, embedding_margin_loss
from ..losses.ldam import ldam_margins
from ..models import Classifier
from ..registry import METHODS
from .base import Method, StepResult, refuse_batch_mixing


@METHODS.register("elm")
class ELM(Method):
    """Logit-margin loss (the configured loss) plus lambda x the embedding-margin loss."""

    # why a step reads device values on the host (issue 21; Method.capture_blockers, tests/test_host_sync.py)
    host_syncs = (
        'ELM: the embedding margin loss selects pairs with boolean masks and branches on them (losses/embedding_margin.py)',
    )

    rebalancing = False  # the logit-margin loss states its own (logit_adjustment: True)

    def __init__(self, *, cfg, data, lam: float = 1.0, temperature: float = 0.1, embed_max_m: float = 0.5,
                 denominator: str = "positive_and_negatives"):
        super().__init__(cfg=cfg, data=data)
        self.lam = number("lam", lam, low=0)
        self.temperature = number("temperature", temperature, low=0, low_open=True)
        self.embed_max_m = number("embed_max_m", embed_max_m, low=0, high=2)
        self.denominator = choice("denominator", denominator, DENOMINATORS)
        refuse_batch_mixing(cfg, "elm", "its embedding margin needs one label per image")
        self.margins = ldam_margins(data.class_counts, self.embed_max_m)  # (C,) float32, rho_y

    def training_step(self, model: Classifier, forward, images: torch.Tensor, target: torch.Tensor, loss: Loss,
                      generator: torch.Generator) -> StepResult:
        features, logits = forward(images)
        total = loss(logits, target)
        if self.lam > 0:
            em = embedding_margin_loss(features.float(), target, self.margins.to(features.device),
                                       temperature=self.temperature, denominator=self.denominator)
            total = total + self.lam * em.to(total.dtype)
        return StepResult(total, logits, target)

    def plain_ce_epochs(self) -> float:
        """lambda = 0 with unweighted `ce` is plain CE throughout."""
        c = self.cfg
        if self.lam > 0 or c.loss.name != "ce" or c.loss.params or c.train.mixup_alpha > 0:
            return 0
        return self._unweighted_epochs()
