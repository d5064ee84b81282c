"""CIFAR ResNets of LDAM-DRW (`models/resnet_cifar.py`, He et al. 2016 Sec. 4.2).

Depth 6n+2 with BasicBlocks x[n, n, n] and widths 16/32/64; option-A shortcuts
(x[:, :, ::2, ::2] zero-padded by planes//4 channels on each side, no parameters) where
the stride or width changes; kaiming_normal_ on every Conv2d and Linear weight.
ResNet-32 (n = 5) has 464,154 parameters with a 10-class linear head.
Parameter names match the official code (conv1, bn1, layer1..3, linear).

`bbn=True` gives BBN's bilateral-branch network (Zhou et al., CVPR 2020; official
megvii-research/BBN `lib/backbone/resnet_cifar.py` `BBN_ResNet_Cifar`, commit
7992e908842f5934f0d1ee3f430d796621e81975): the first n-1 blocks of layer3 are shared, and each
branch has its own copy of the last block (`cb_block`: conventional, `rb_block`: re-balancing;
64 -> 64 channels, stride 1 for n >= 2; for n = 1 it is the 32 -> 64 stride-2 block). The
feature map is the concatenation of the two branches' maps (128 channels), so the head is
Linear(128, C), and a plain forward (eval: `longtail eval / predict / export`) is BBN's test
pass, `cat(f_c, f_r)` (official `valid_model`: alpha = 0.5 with the factor 2 of its training
mix). `bilateral(alpha)` switches the next forwards to the training pass of methods/bbn.py:
a batch of 2B images is the conventional batch followed by the re-balancing batch, each goes
through the shared layers in its own pass (its own BatchNorm batch statistics, as the
official's two `model(...)` calls), and the map is 2 * cat(alpha * f_c, (1 - alpha) * f_r)
(`bbn_mix`). As in the official `Network`, the head keeps PyTorch's default Linear
initialisation (the kaiming init covers the backbone only). ResNet-32 with BBN has 538,778
parameters with a 10-class head (ResNet-32: 464,154).

`experts={num, shared_stages, widths, scale}` gives RIDE's multi-expert network (models/experts.py;
official `ride_resnet_cifar.py` `ResNet_s`): the stem and the first `shared_stages` stages are shared,
each expert has its own copies of the later stages (`layer2s.<e>`, `layer3s.<e>`, widths e.g. 24/48
for `widths: ride`) and its own head (`linears.<e>`). `shared_stages: none` shares nothing (NCL's
independent networks, official Bazinga699/NCL `multi_Network`): each expert also has its own stem
(`conv1s.<e>`, `bn1s.<e>`, as wide as its first stage) and `layer1s.<e>`. Option-A shortcuts pad (planes - in_planes) // 2
channels on each side (the official RIDE form; equal to planes // 4 for the plain widths).
`rsg=True` adds RSG's training-only module (Wang et al., CVPR 2021; models/rsg.py, official
Jianf-Wang/RSG `models/resnet_cifar.py`, commit 3c5074511455428d81af89e1621493dcdb5db6ce) on the
layer2 maps (32 channels), with `rsg_centers` centres per class (official 15) and a contrastive
module of width `rsg_dim` (official 256). A plain forward (eval, predict, export) never calls it;
`rsg_pass(hook)` makes the forwards inside the block pass the layer2 maps through `hook(maps) ->
maps` (methods/rsg.py: RSG's training pass, which may append generated samples). The backbone's
initialisation is unchanged (the module is built after it, with its own init). ResNet-32 + RSG
with 10 classes: 464,154 + 626,232 parameters (training only).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import MODELS
from .base import Classifier
from .experts import ExpertHeads, ExpertNetwork, parse_experts
from .heads import build_head
from .rsg import RSGModule


class _ShortcutA(nn.Module):
    def __init__(self, in_planes: int, planes: int):
        super().__init__()
        self.pad = (planes - in_planes) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlockA(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _ShortcutA(in_planes, planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(ExpertNetwork, Classifier):
    head_name = "linear"

    def __init__(self, *, depth: int = 32, num_classes: int = 10, in_channels: int = 3, head: str = "linear",
                 bbn: bool = False, experts: dict | None = None, rsg: bool = False, rsg_centers: int = 15,
                 rsg_dim: int = 256):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        if not isinstance(bbn, bool):
            raise ValueError(f"bbn must be true or false, got {bbn!r}")
        spec = parse_experts(experts, plain_widths=(16, 32, 64), allow_independent=True)
        if spec is not None and bbn:
            raise ValueError("bbn and experts are two different networks: set one of them")
        if not isinstance(rsg, bool):
            raise ValueError(f"rsg must be true or false, got {rsg!r}")
        if rsg and bbn:
            raise ValueError("rsg and bbn cannot be combined (one training pass each)")
        if rsg and spec is not None:
            raise ValueError("rsg and experts cannot be combined (RSG's module sits on the one layer2 of a plain net)")
        n = (depth - 2) // 6
        self.num_experts = 0
        self._rsg_hook, self.rsg = None, None
        if spec is not None and spec.independent:  # NCL: every expert has its own stem (conv1s / bn1s)
            self._build_experts(spec, n, head, num_classes, in_channels=in_channels)
            return
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        if spec is not None:
            self._build_experts(spec, n, head, num_classes)
            return
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlockA(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.bbn = bbn
        self._bilateral_alpha: float | None = None
        last = layers[2][-1]
        if bbn:  # BBN: the last block of layer3 becomes two branch copies
            layers[2] = nn.Sequential(*list(layers[2])[:-1])
        self.layer1, self.layer2, self.layer3 = layers
        if bbn:
            self.cb_block = last
            self.rb_block = BasicBlockA(last.conv1.in_channels, 64, last.conv1.stride[0])
        self.num_features = 128 if bbn else 64
        self.linear = build_head(head, in_features=self.num_features, num_classes=num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
        if bbn and isinstance(self.linear, nn.Linear):
            self.linear.reset_parameters()  # official BBN: the classifier keeps torch's default init
        self._rsg_hook = None
        self.rsg = (RSGModule(channels=32, num_classes=num_classes, n_center=rsg_centers, contrastive_dim=rsg_dim)
                    if rsg else None)  # built last: the backbone's initialisation is the plain network's

    @staticmethod
    def _stage(in_planes: int, planes: int, stride: int, n: int) -> nn.Sequential:
        return nn.Sequential(*[BasicBlockA(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
                               for i in range(n)])

    def _build_experts(self, spec, n: int, head: str, num_classes: int, in_channels: int = 3) -> None:
        # registration order = the plain network's (stem, layer1.., expert stages, heads), so with
        # E = 1 and full widths the kaiming init draws the same numbers as the plain network
        plain = ((16, 1), (32, 2), (64, 2))
        in_planes = 16
        if spec.independent:  # own stems, as wide as each expert's first stage (16 for full widths)
            in_planes = spec.widths[0]
            self.conv1s = nn.ModuleList(nn.Conv2d(in_channels, in_planes, 3, 1, 1, bias=False)
                                        for _ in range(spec.num))
            self.bn1s = nn.ModuleList(nn.BatchNorm2d(in_planes) for _ in range(spec.num))
        for k in range(spec.shared_stages):
            planes, stride = plain[k]
            setattr(self, f"layer{k + 1}", self._stage(in_planes, planes, stride, n))
            in_planes = planes
        for j, planes in enumerate(spec.widths):
            k = spec.shared_stages + j
            if planes < in_planes or (planes - in_planes) % 2:
                raise ValueError(f"experts.widths: stage {k + 1} of a CIFAR ResNet needs a width >= {in_planes} "
                                 f"that differs from it by an even number (option-A shortcut), got {planes}")
            setattr(self, f"layer{k + 1}s", nn.ModuleList(
                self._stage(in_planes, planes, plain[k][1], n) for _ in range(spec.num)))
            in_planes = planes
        self.head_name = "linears"
        self.num_experts = spec.num
        self.expert_spec = spec
        self.bbn = False
        self._bilateral_alpha = None
        self.num_features = in_planes * spec.num
        self.linears = ExpertHeads([build_head(head, in_features=in_planes, num_classes=num_classes)
                                    for _ in range(spec.num)], scale=spec.scale)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _shared(self, images: torch.Tensor) -> torch.Tensor:
        if self.expert_spec.independent:
            return images
        out = F.relu(self.bn1(self.conv1(images)))
        for k in range(self.expert_spec.shared_stages):
            out = getattr(self, f"layer{k + 1}")(out)
        return out

    def expert_branch(self, shared: torch.Tensor, index: int) -> torch.Tensor:
        out = shared
        if self.expert_spec.independent:
            out = F.relu(self.bn1s[index](self.conv1s[index](out)))
        for k in range(self.expert_spec.shared_stages, 3):
            out = getattr(self, f"layer{k + 1}s")[index](out)
        return out

    def _trunk(self, images: torch.Tensor) -> torch.Tensor:
        out = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(images)))))
        if self._rsg_hook is not None:
            out = self._rsg_hook(out)
        return self.layer3(out)

    @property
    def graph_capturable(self) -> bool:
        """False inside rsg_pass / bilateral: the pass then reads the hook's labels or BBN's mixing
        weight, which a CUDA-graph replay of images -> outputs would not see (engine/graphs.py)."""
        return self._rsg_hook is None and self._bilateral_alpha is None

    @contextmanager
    def rsg_pass(self, hook):
        """RSG's training pass for the forwards inside the block: the layer2 maps (B, 32, h, w)
        become `hook(maps)` (B + G rows: RSG appends its generated samples) before layer3."""
        if self.rsg is None:
            raise RuntimeError("rsg_pass() needs the RSG module (model.params.rsg: true)")
        self._rsg_hook = hook
        try:
            yield self
        finally:
            self._rsg_hook = None

    @contextmanager
    def bilateral(self, alpha: float):
        """BBN's training pass for the forwards inside the block: images (2B, ...) = the
        conventional batch then the re-balancing batch; the map is
        2 * cat(alpha * cb_block(trunk(first B)), (1 - alpha) * rb_block(trunk(last B)))."""
        if not self.bbn:
            raise RuntimeError("bilateral() needs the BBN network (model.params.bbn: true)")
        self._bilateral_alpha = float(alpha)
        try:
            yield self
        finally:
            self._bilateral_alpha = None

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.num_experts:
            return torch.cat(self.expert_maps(images), dim=1)
        if not self.bbn:
            return self._trunk(images)
        alpha = self._bilateral_alpha
        if alpha is None:  # BBN's test pass: both branches on the same images, equal weights
            out = self._trunk(images)
            return torch.cat((self.cb_block(out), self.rb_block(out)), dim=1)
        if images.shape[0] % 2:
            raise ValueError(f"a bilateral batch holds two batches of equal size, got {images.shape[0]} images")
        half = images.shape[0] // 2
        f_c = self.cb_block(self._trunk(images[:half]))
        f_r = self.rb_block(self._trunk(images[half:]))
        return 2.0 * torch.cat((alpha * f_c, (1.0 - alpha) * f_r), dim=1)


def _register(depth: int) -> None:
    def build(*, num_classes: int, in_channels: int = 3, head: str = "linear", bbn: bool = False,
              experts: dict | None = None, rsg: bool = False, rsg_centers: int = 15, rsg_dim: int = 256) -> CifarResNet:
        return CifarResNet(depth=depth, num_classes=num_classes, in_channels=in_channels, head=head, bbn=bbn,
                           experts=experts, rsg=rsg, rsg_centers=rsg_centers, rsg_dim=rsg_dim)

    build.__doc__ = (f"CIFAR ResNet-{depth} (LDAM-DRW, option-A shortcuts, widths 16/32/64); "
                     "bbn: true gives BBN's two-branch last block; experts: {num, shared_stages, widths, "
                     "scale} RIDE's multi-expert split; rsg: true adds RSG's training-only module after layer2 "
                     "(rsg_centers, rsg_dim).")
    MODELS.register(f"resnet{depth}")(build)


for _depth in (20, 32, 44, 56, 110):
    _register(_depth)
