"""Several seeds of one CIFAR ResNet trained as one packed network (issue 21, speed).

K members (plain `CifarResNet`s of one depth / class count / input channels, linear head; no
BBN, experts or RSG) become one module whose forward takes each member's own batch,
`images (K, B, C_in, H, W)`, and returns each member's logits `(K, B, num_classes)`. The
members never mix: the loss of member j has an exactly zero gradient for member k's
parameters, BatchNorm normalises each member's channels over its own batch and keeps its own
running statistics, and SGD (momentum, weight decay, any per-element optimiser) updates every
element as it would update the member's. Two implementations behind one API (`mode`):

- ``grouped``: the members' channels side by side. The stem is Conv2d(K*C_in, K*16,
  groups=K) on the member batches stacked along channels ((K, B, C, H, W) -> (B, K*C, H, W));
  every conv is grouped (groups=K), every BatchNorm2d has K*C channels (so its per-channel
  statistics are per member, running ones too), the option-A shortcut subsamples and pads
  each member's channels on their own, and the head is a batched matmul of the pooled
  (K, B, D) features with stacked (K, C, D) weights plus (K, C) biases. The per-member
  `num_batches_tracked` counters live on as `member_batches` (K,) plus the layer's own count.
- ``vmap``: `torch.func.stack_module_state`-style stacked parameters and buffers (K, ...) held
  in a copy of the member's own module tree (same names, same module types: the project's
  `no_decay_split` finds the BatchNorm parameters and biases), and `torch.func.functional_call`
  under `torch.func.vmap` over (parameters, buffers, images). BatchNorm in training mode works
  there because the running statistics are themselves vmapped (K, C) buffers: its in-place
  update of a batched buffer writes each member's slice (an unbatched buffer could not take
  a batched update; that is what `replace_all_batch_norm_modules_` is for, not needed here).

`pack(members, mode=...)` copies the members in (they are left untouched), `unpack(packed)`
gives K new `CifarResNet`s with exact copies of each member's parameters and buffers
(running statistics and counters included), `members(packed)` is K. Neither is wired into the
Trainer or `longtail bench`: benchmarks/packed_seeds.py measures whether it pays
(docs/speed.md, "Several seeds as one packed network").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, did_you_mean
from .cifar_resnet import CifarResNet

MODES = ("grouped", "vmap")
_STAGES = ((16, 1), (32, 2), (64, 2))


def _arch(net: CifarResNet) -> tuple[int, int, int]:
    """(depth, num_classes, in_channels) of a plain CIFAR ResNet."""
    return 6 * len(net.layer1) + 2, net.linear.out_features, net.conv1.in_channels


def _check_members(nets) -> list[CifarResNet]:
    if not isinstance(nets, (list, tuple)) or not nets:
        raise ConfigError(f"pack: members must be a non-empty list of CifarResNet networks, got {type(nets).__name__}"
                          + (" of length 0" if isinstance(nets, (list, tuple)) else ""))
    for i, net in enumerate(nets):
        if not isinstance(net, CifarResNet):
            raise ConfigError(f"pack: member {i} is a {type(net).__name__}, not a CifarResNet (resnet20/32/44/56/110)")
        if net.num_experts or net.bbn or net.rsg is not None or type(getattr(net, "linear", None)) is not nn.Linear:
            raise ConfigError(f"pack: member {i} is not a plain CIFAR ResNet with a linear head "
                              "(BBN, experts, RSG and other heads cannot be packed)")
    first = _arch(nets[0])
    ref = next(nets[0].parameters())
    for i, net in enumerate(nets[1:], start=1):
        if _arch(net) != first:
            d, c, ch = _arch(net)
            raise ConfigError(f"pack: member {i} is resnet{d} with {c} classes and {ch} input channels, member 0 is "
                              f"resnet{first[0]} with {first[1]} classes and {first[2]} input channels: "
                              "members must share one architecture")
        for t in list(net.parameters()) + [b for b in net.buffers() if b.is_floating_point()]:
            if t.dtype != ref.dtype or t.device != ref.device:
                raise ConfigError(f"pack: member {i} holds {t.dtype} on {t.device}, member 0 {ref.dtype} on "
                                  f"{ref.device}: move every member to one dtype and device first")
    for i, net in enumerate(nets):
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d) and not (m.affine and m.track_running_stats and m.eps == 1e-5
                                                       and m.momentum == 0.1):
                raise ConfigError(f"pack: member {i} has a BatchNorm2d with non-default settings (affine, "
                                  "track_running_stats, eps 1e-5, momentum 0.1 are required)")
    return list(nets)


class _MemberBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over K members' channels; `member_batches[k] + num_batches_tracked` is member k's
    counter (the counters only count: with momentum 0.1 they do not enter the arithmetic)."""

    def __init__(self, channels: int, members: int):
        super().__init__(channels)
        self.register_buffer("member_batches", torch.zeros(members, dtype=torch.long))


class _GroupedShortcutA(nn.Module):
    """Option-A shortcut on each member's channels: x[:, :, ::2, ::2], then `pad` zero channels on each side."""

    def __init__(self, members: int, in_planes: int, planes: int):
        super().__init__()
        self.members, self.in_planes, self.pad = members, in_planes, (planes - in_planes) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sub = x[:, :, ::2, ::2]
        b, _, h, w = sub.shape
        sub = sub.reshape(b, self.members, self.in_planes, h, w)
        return F.pad(sub, (0, 0, 0, 0, self.pad, self.pad)).reshape(b, -1, h, w)


class _GroupedBlock(nn.Module):
    def __init__(self, members: int, in_planes: int, planes: int, stride: int):
        super().__init__()
        k = members
        self.conv1 = nn.Conv2d(k * in_planes, k * planes, 3, stride, 1, bias=False, groups=k)
        self.bn1 = _MemberBatchNorm2d(k * planes, k)
        self.conv2 = nn.Conv2d(k * planes, k * planes, 3, 1, 1, bias=False, groups=k)
        self.bn2 = _MemberBatchNorm2d(k * planes, k)
        self.shortcut = (_GroupedShortcutA(k, in_planes, planes) if stride != 1 or in_planes != planes
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _StackedLinear(nn.Module):
    """K linear heads: weight (K, C, D), bias (K, C); (K, B, D) -> (K, B, C)."""

    def __init__(self, members: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(members, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


class _Packed(nn.Module):
    mode: str

    def __init__(self, num_members: int, arch: tuple[int, int, int]):
        super().__init__()
        self.num_members = num_members
        self.depth, self.num_classes, self.in_channels = arch

    def _check_images(self, images) -> None:
        if (not isinstance(images, torch.Tensor) or images.dim() != 5 or images.shape[0] != self.num_members
                or images.shape[2] != self.in_channels):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ConfigError(f"packed forward: images must be (K={self.num_members}, B, {self.in_channels}, H, W), "
                              f"one batch per member, got {shape}")


class PackedGrouped(_Packed):
    """The members as one network of grouped convolutions (module docstring, `grouped`)."""

    mode = "grouped"

    def __init__(self, num_members: int, arch: tuple[int, int, int]):
        super().__init__(num_members, arch)
        k, n = num_members, (self.depth - 2) // 6
        self.conv1 = nn.Conv2d(k * self.in_channels, k * 16, 3, 1, 1, bias=False, groups=k)
        self.bn1 = _MemberBatchNorm2d(k * 16, k)
        in_planes = 16
        for s, (planes, stride) in enumerate(_STAGES):
            blocks = []
            for i in range(n):
                blocks.append(_GroupedBlock(k, in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.num_features = in_planes
        self.linear = _StackedLinear(k, in_planes, self.num_classes)

    def forward(self, images: torch.Tensor, *, return_features: bool = False):
        """images (K, B, C_in, H, W) -> logits (K, B, classes); with return_features also the
        pooled features (K, B, 64)."""
        self._check_images(images)
        k, b = images.shape[:2]
        x = images.transpose(0, 1).reshape(b, k * self.in_channels, *images.shape[3:])
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        feats = out.mean(dim=(2, 3)).reshape(b, k, self.num_features).transpose(0, 1)
        logits = self.linear(feats)
        return (logits, feats) if return_features else logits

    def _pairs(self, member: CifarResNet):
        """(packed module, member module) for every conv / BN, in order."""
        yield self.conv1, member.conv1
        yield self.bn1, member.bn1
        for s in (1, 2, 3):
            for pb, mb in zip(getattr(self, f"layer{s}"), getattr(member, f"layer{s}")):
                yield from ((pb.conv1, mb.conv1), (pb.bn1, mb.bn1), (pb.conv2, mb.conv2), (pb.bn2, mb.bn2))

    @torch.no_grad()
    def load_members(self, nets: list[CifarResNet]) -> None:
        pairs = [list(self._pairs(m)) for m in nets]
        for j, (packed_mod, _) in enumerate(pairs[0]):
            mods = [p[j][1] for p in pairs]
            packed_mod.weight.copy_(torch.cat([m.weight for m in mods]))
            if isinstance(packed_mod, nn.BatchNorm2d):
                for name in ("bias", "running_mean", "running_var"):
                    getattr(packed_mod, name).copy_(torch.cat([getattr(m, name) for m in mods]))
                packed_mod.num_batches_tracked.zero_()
                packed_mod.member_batches.copy_(torch.stack([m.num_batches_tracked for m in mods]))
        self.linear.weight.copy_(torch.stack([m.linear.weight for m in nets]))
        self.linear.bias.copy_(torch.stack([m.linear.bias for m in nets]))

    @torch.no_grad()
    def member_state(self, index: int) -> dict:
        """Member `index`'s state_dict (names of CifarResNet), cloned."""
        template = _skeleton(self.depth, self.num_classes, self.in_channels)
        state = {}
        names = {id(m): name for name, m in template.named_modules()}
        for packed_mod, mod in self._pairs(template):
            c = packed_mod.weight.shape[0] // self.num_members
            rows = slice(index * c, (index + 1) * c)
            prefix = names[id(mod)]
            state[f"{prefix}.weight"] = packed_mod.weight[rows].clone()
            if isinstance(packed_mod, nn.BatchNorm2d):
                for name in ("bias", "running_mean", "running_var"):
                    state[f"{prefix}.{name}"] = getattr(packed_mod, name)[rows].clone()
                state[f"{prefix}.num_batches_tracked"] = (packed_mod.member_batches[index]
                                                          + packed_mod.num_batches_tracked).clone()
        state["linear.weight"] = self.linear.weight[index].clone()
        state["linear.bias"] = self.linear.bias[index].clone()
        return state


class _WithFeatures(nn.Module):
    def __init__(self, net: CifarResNet):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor):
        feats = self.net.forward_head(self.net.forward_features(images), pre_logits=True)
        return self.net.linear(feats), feats


class PackedVmap(_Packed):
    """The members as stacked tensors in one module tree, run by functional_call under vmap
    (module docstring, `vmap`)."""

    mode = "vmap"

    def __init__(self, num_members: int, arch: tuple[int, int, int], template: CifarResNet):
        super().__init__(num_members, arch)
        self.stacked = _WithFeatures(template)  # parameters / buffers replaced by (K, ...) stacks
        self.num_features = template.num_features

    @torch.no_grad()
    def load_members(self, nets: list[CifarResNet]) -> None:
        for name, mod in list(self.stacked.net.named_modules()):
            own = dict(nets[0].get_submodule(name).named_parameters(recurse=False))
            for pname in own:
                stacked = torch.stack([getattr(n.get_submodule(name), pname).detach() for n in nets])
                setattr(mod, pname, nn.Parameter(stacked.clone(), requires_grad=own[pname].requires_grad))
            for bname, buf in list(mod.named_buffers(recurse=False)):
                mod.register_buffer(bname, torch.stack([getattr(n.get_submodule(name), bname) for n in nets]).clone())

    def forward(self, images: torch.Tensor, *, return_features: bool = False):
        """images (K, B, C_in, H, W) -> logits (K, B, classes); with return_features also the
        pooled features (K, B, D)."""
        self._check_images(images)
        params = dict(self.stacked.named_parameters())
        buffers = dict(self.stacked.named_buffers())

        def one(p, b, x):
            return torch.func.functional_call(self.stacked, (p, b), (x,))

        logits, feats = torch.func.vmap(one)(params, buffers, images)
        return (logits, feats) if return_features else logits

    @torch.no_grad()
    def member_state(self, index: int) -> dict:
        return {name: t[index].clone() for name, t in self.stacked.net.state_dict(keep_vars=True).items()}


def _skeleton(depth: int, num_classes: int, in_channels: int) -> CifarResNet:
    """A CifarResNet on the meta device (no memory, no draw from the global RNG)."""
    with torch.device("meta"):
        return CifarResNet(depth=depth, num_classes=num_classes, in_channels=in_channels)


def pack(members: list[CifarResNet], *, mode: str = "grouped") -> PackedGrouped | PackedVmap:
    """K plain CifarResNets (one architecture, dtype and device) as one packed network.

    mode: 'grouped' (grouped convolutions) or 'vmap' (functional_call under torch.func.vmap).
    The members are copied in and left unchanged; the packed network is in the first member's
    train / eval mode. forward(images (K, B, C_in, H, W)) -> logits (K, B, classes).
    """
    if not isinstance(mode, str) or mode not in MODES:
        raise ConfigError(f"pack: mode must be one of {', '.join(MODES)}, got {mode!r}"
                          + (did_you_mean(mode, MODES) if isinstance(mode, str) else ""))
    nets = _check_members(members)
    arch = _arch(nets[0])
    ref = next(nets[0].parameters())
    if mode == "grouped":
        with torch.device("meta"):
            packed = PackedGrouped(len(nets), arch)
        packed = packed.to_empty(device=ref.device).to(ref.dtype)
    else:
        template = _skeleton(*arch).to_empty(device=ref.device).to(ref.dtype)
        packed = PackedVmap(len(nets), arch, template)
    packed.load_members(nets)  # sets every tensor to_empty left uninitialised
    packed.train(nets[0].training)
    return packed


def members(packed: PackedGrouped | PackedVmap) -> int:
    """K, the number of members of a packed network."""
    if not isinstance(packed, _Packed):
        raise ConfigError(f"members: expected a packed network (longtail.models.packed.pack), "
                          f"got {type(packed).__name__}")
    return packed.num_members


def unpack(packed: PackedGrouped | PackedVmap) -> list[CifarResNet]:
    """The K members as new CifarResNets: exact copies of each member's parameters and buffers
    (BatchNorm running statistics and counters included), in the packed network's mode."""
    k = members(packed)
    out = []
    for i in range(k):
        net = _skeleton(packed.depth, packed.num_classes, packed.in_channels)
        state = packed.member_state(i)
        net.load_state_dict(state, strict=True, assign=True)
        for p in net.parameters():
            p.requires_grad_(True)
        net.train(packed.training)
        out.append(net)
    return out


__all__ = ["MODES", "PackedGrouped", "PackedVmap", "members", "pack", "unpack"]
