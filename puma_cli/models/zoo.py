"""The image networks the unlearning literature uses, as built-in architectures.

- `resnet18`: ResNet-18 in its CIFAR form (He et al. 2016, as in the unlearning papers
  that follow Kurmanji et al. 2023 and Fan et al. 2024): a 3x3 stride-1 stem and no
  max-pool, four stages of two BasicBlocks, widths w, 2w, 4w, 8w (w = 64: 11.2 M
  parameters for 10 classes), BatchNorm, global average pooling, one linear layer.
- `densenet`: the paper's DenseNet (its Listing 2, Huang et al. 2017 in the CIFAR form):
  bottleneck layers of growth rate 12, blocks (6, 12, 24, 16), transitions halving the
  channels; about 1.0 M parameters for 10 classes. One change: the last pooling adapts
  to the feature map (the listing's fixed 4x4 pool assumes 32x32 inputs), which is the
  same on 32x32 images and lets 28x28 MNIST through.

Both take images (n, C, H, W) of any channel count and return logits (n, K). Each
knows how the code bases its weights most often come from name its tensors
(`FOREIGN_NAMES`), so that `puma import` reads their state dicts as they were saved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ForeignNames:
    """How other code bases name the tensors of one of these networks: a name starting
    with a `prefixes` key has it replaced by its value, then each `parts` key inside it
    by its value (pairs, in order)."""

    whose: str
    prefixes: tuple[tuple[str, str], ...]
    parts: tuple[tuple[str, str], ...] = ()

    def rename(self, name: str) -> str:
        """Their name for a tensor -> ours."""
        for theirs, ours in self.prefixes:
            if name.startswith(theirs):
                name = ours + name[len(theirs) :]
                break
        for theirs, ours in self.parts:
            name = name.replace(theirs, ours)
        return name


class BasicBlock(nn.Module):
    def __init__(self, planes_in: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(planes_in, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or planes_in != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(planes_in, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: input (n, C, H, W) -> logits (n, n_classes)."""

    # kuangliu/pytorch-cifar's ResNet18, which much CIFAR and unlearning code trains,
    # names its stages layer1..layer4; torchvision's resnet18, given a 3x3 stem and no
    # max-pool as CIFAR code often does, also calls the shortcut downsample, the head fc.
    FOREIGN_NAMES = ForeignNames(
        "the layer1..layer4 names of kuangliu/pytorch-cifar's and torchvision's ResNet-18",
        (*((f"layer{k}.", f"layers.{k - 1}.") for k in range(1, 5)), ("fc.", "linear.")),
        ((".downsample.", ".shortcut."),),
    )

    def __init__(self, channels: int, n_classes: int, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages: list[nn.Module] = []
        planes_in = width
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = width * 2**i
            stages.append(
                nn.Sequential(BasicBlock(planes_in, planes, stride), BasicBlock(planes, planes, 1))
            )
            planes_in = planes
        self.layers = nn.Sequential(*stages)
        self.linear = nn.Linear(planes_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class Bottleneck(nn.Module):
    def __init__(self, planes_in: int, growth_rate: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(planes_in)
        self.conv1 = nn.Conv2d(planes_in, 4 * growth_rate, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    def __init__(self, planes_in: int, planes_out: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(planes_in)
        self.conv = nn.Conv2d(planes_in, planes_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet(nn.Module):
    """The paper's Listing 2: input (n, C, H, W) -> logits (n, n_classes)."""

    # The listing's own names (kuangliu/pytorch-cifar's densenet_cifar has the same):
    # dense1, trans1, ..., dense4 are our features.0 to features.6.
    FOREIGN_NAMES = ForeignNames(
        "the dense1..dense4, trans1..trans3 names of the paper's Listing 2",
        (
            *((f"dense{k}.", f"features.{2 * k - 2}.") for k in range(1, 5)),
            *((f"trans{k}.", f"features.{2 * k - 1}.") for k in range(1, 4)),
        ),
    )

    def __init__(
        self,
        channels: int,
        n_classes: int,
        growth_rate: int = 12,
        blocks: Sequence[int] = (6, 12, 24, 16),
        reduction: float = 0.5,
    ) -> None:
        super().__init__()
        if len(blocks) != 4:
            raise ValueError(f"blocks must hold four counts, not {list(blocks)}")
        planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(channels, planes, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for i, count in enumerate(blocks):
            layers = []
            for _ in range(count):
                layers.append(Bottleneck(planes, growth_rate))
                planes += growth_rate
            stages.append(nn.Sequential(*layers))
            if i < 3:
                out_planes = math.floor(planes * reduction)
                stages.append(Transition(planes, out_planes))
                planes = out_planes
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(planes)
        self.linear = nn.Linear(planes, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.features(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))
