"""ImageNet-style ResNets (He et al. 2016) with torchvision's parameter names.

`resnet18/34/50/101/152` match torchvision's `state_dict` keys and shapes exactly (v1.5:
stride on the 3x3 convolution of the bottleneck), so weight files users already have load
with `model.weights=FILE`. `resnet10` (BasicBlock x[1, 1, 1, 1]) is the ImageNet-LT
backbone of classifier-balancing / OLTR. Init as torchvision: kaiming_normal_ (fan_out,
relu) for convolutions, BN weight 1 and bias 0.

`experts={num, shared_stages, widths, scale}` gives RIDE's multi-expert ResNet (models/experts.py;
official `model/fb_resnets/RIDEResNet.py`): stem + the first `shared_stages` stages shared (official:
2, layer1 and layer2; 3 is its `share_layer3`), each expert with its own later stages (`layer3s.<e>`,
`layer4s.<e>`; `widths: ride` = 192/384 as the official `reduce_dimension`) and head (`linears.<e>`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import MODELS
from .base import Classifier
from .experts import ExpertHeads, ExpertNetwork, parse_experts
from .heads import build_head


def _conv3x3(i: int, o: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(i, o, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(ExpertNetwork, Classifier):
    head_name = "fc"

    def __init__(self, *, block: type, layers: list[int], num_classes: int = 1000, in_channels: int = 3,
                 head: str = "linear", experts: dict | None = None):
        super().__init__()
        spec = parse_experts(experts, plain_widths=(64, 128, 256, 512))
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.num_experts = 0
        if spec is None:
            self.layer1 = self._make_layer(block, 64, layers[0])
            self.layer2 = self._make_layer(block, 128, layers[1], 2)
            self.layer3 = self._make_layer(block, 256, layers[2], 2)
            self.layer4 = self._make_layer(block, 512, layers[3], 2)
            self.num_features = 512 * block.expansion
            self.fc = build_head(head, in_features=self.num_features, num_classes=num_classes)
        else:
            self._build_experts(spec, block, layers, head, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _build_experts(self, spec, block: type, layers: list[int], head: str, num_classes: int) -> None:
        plain = ((64, 1), (128, 2), (256, 2), (512, 2))
        for k in range(spec.shared_stages):
            setattr(self, f"layer{k + 1}", self._make_layer(block, plain[k][0], layers[k], plain[k][1]))
        for j, planes in enumerate(spec.widths):
            k = spec.shared_stages + j
            start = self.inplanes
            stages = []
            for _ in range(spec.num):
                self.inplanes = start
                stages.append(self._make_layer(block, planes, layers[k], plain[k][1]))
            setattr(self, f"layer{k + 1}s", nn.ModuleList(stages))
        self.head_name = "linears"
        self.num_experts = spec.num
        self.expert_spec = spec
        self.num_features = self.inplanes * spec.num
        self.linears = ExpertHeads([build_head(head, in_features=self.inplanes, num_classes=num_classes)
                                    for _ in range(spec.num)], scale=spec.scale)

    def _shared(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        for k in range(self.expert_spec.shared_stages):
            x = getattr(self, f"layer{k + 1}")(x)
        return x

    def expert_branch(self, shared: torch.Tensor, index: int) -> torch.Tensor:
        x = shared
        for k in range(self.expert_spec.shared_stages, 4):
            x = getattr(self, f"layer{k + 1}s")[index](x)
        return x

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.num_experts:
            return torch.cat(self.expert_maps(images), dim=1)
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


_SPECS = {10: (BasicBlock, [1, 1, 1, 1]), 18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]),
          50: (Bottleneck, [3, 4, 6, 3]), 101: (Bottleneck, [3, 4, 23, 3]), 152: (Bottleneck, [3, 8, 36, 3])}


def _register(depth: int) -> None:
    block, layers = _SPECS[depth]

    def build(*, num_classes: int, in_channels: int = 3, head: str = "linear", experts: dict | None = None) -> ResNet:
        return ResNet(block=block, layers=layers, num_classes=num_classes, in_channels=in_channels, head=head,
                      experts=experts)

    build.__doc__ = (f"ImageNet ResNet-{depth} ({block.__name__} x{layers}), torchvision parameter names; "
                     "experts: {num, shared_stages, widths, scale} RIDE's multi-expert split.")
    MODELS.register(f"resnet{depth}")(build)


for _depth in _SPECS:
    _register(_depth)
