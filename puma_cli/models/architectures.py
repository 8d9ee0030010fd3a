"""The model zoo, built from the architecture recorded in a checkpoint.

Every model is a `Classifier`: feature standardisation (buffers `mean`, `std`, fitted
on the training data, or fixed to the transform imported weights were trained behind,
and saved with the weights) followed by a network that maps the standardised input to
logits. The influence engine differentiates the network's parameters only; the
standardisation is fixed.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from puma_cli.errors import CheckpointError, PumaError
from puma_cli.models.user import UserSource, construct, user_class
from puma_cli.models.zoo import DenseNet, ResNet18

ARCHITECTURES = ("mlp", "cnn", "resnet18", "densenet")  # built in; "user" is FILE.py:Class
IMAGE_ARCHITECTURES = ARCHITECTURES[1:]  # the built-ins that take images (n, C, H, W)
ACTIVATIONS = ("relu", "sigmoid")
# The Architecture fields (beside name, input shape, classes and shards) each net is built
# from: the others keep their defaults, and describe nothing about that net.
SHAPED_BY: dict[str, tuple[str, ...]] = {
    "mlp": ("hidden", "activation"),
    "cnn": ("hidden", "channels"),
    "resnet18": ("args",),
    "densenet": ("args",),
    "user": ("args", "source"),
}
OPTIONAL_FIELDS = ("hidden", "activation", "channels", "args", "source")


@dataclass(frozen=True)
class Architecture:
    """What it takes to rebuild a model: name, input shape, classes, and the net's arguments."""

    name: str
    input_shape: tuple[int, ...]
    n_classes: int
    hidden: tuple[int, ...] = (64, 32)
    activation: str = "relu"
    channels: tuple[int, ...] = field(default=(16, 32))
    shards: int = 1
    args: dict[str, Any] = field(default_factory=dict)  # --arch-args, as JSON
    source: UserSource | None = None  # name "user": the file and class it was built from

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["source"] = self.source.to_dict() if self.source is not None else None
        return data

    @property
    def label(self) -> str:
        return self.source.label if self.source is not None else f"--arch {self.name}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Architecture:
        try:
            return cls(
                name=str(data["name"]),
                input_shape=tuple(int(v) for v in data["input_shape"]),
                n_classes=int(data["n_classes"]),
                hidden=tuple(int(v) for v in data.get("hidden", (64, 32))),
                activation=str(data.get("activation", "relu")),
                channels=tuple(int(v) for v in data.get("channels", (16, 32))),
                shards=int(data.get("shards", 1)),
                args=dict(data.get("args") or {}),
                source=UserSource.from_dict(data["source"]) if data.get("source") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the recorded architecture is malformed ({exc})") from exc


class FlexibleFCN(nn.Module):
    """The paper's fully connected network (Appendix A, Listing 1)."""

    def __init__(self, neurons: list[int], activation: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(neurons))
        self.activation: nn.Module = nn.ReLU() if activation == "relu" else nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


class SmallCNN(nn.Module):
    """Two conv/pool stages and a hidden dense layer: enough for 8x8 digits or 28x28 MNIST."""

    def __init__(
        self, input_shape: tuple[int, ...], channels: tuple[int, ...], hidden: int, n_classes: int
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * (h // 4) * (w // 4), hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def standardised_shape(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the mean and std inputs are standardised with: each feature of a table
    (d,), each channel of images (C, H, W) and volumes (C, D, H, W), and each position of
    each feature of anything with two axes a row, (T, F) or (C, L), whose order says
    nothing about which axis is the channel."""
    if len(input_shape) >= 3:
        return (input_shape[0], *(1,) * (len(input_shape) - 1))
    return input_shape


def frozen_parameters(model: nn.Module) -> int:
    """How many of the model's parameters are frozen (requires_grad False, as a pretrained
    body under a head that trains): training and removal leave them where they are."""
    return sum(p.numel() for p in model.parameters() if not p.requires_grad)


class Classifier(nn.Module):
    """Standardise, then classify. Input (n, *input_shape) float32 -> logits (n, K).

    A two-class network with one output (a binary head, trained elsewhere with
    BCEWithLogitsLoss) gives logits (0, z): the softmax of those is (1 - sigmoid(z),
    sigmoid(z)), so the cross-entropy puma trains, differentiates and measures is the
    binary cross-entropy on z, and the weights are the network's as they are.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        self.register_buffer("mean", torch.zeros(standardised_shape(arch.input_shape)))
        self.register_buffer("std", torch.ones(self.mean.shape))
        self.net = build_net(arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net((x - self.mean) / self.std)
        if (
            self.arch.n_classes == 2
            and isinstance(out, torch.Tensor)
            and out.ndim == 2
            and out.shape[1] == 1
        ):
            return torch.cat([torch.zeros_like(out), out], dim=1)  # class 1's logit against 0
        return out

    def fit_standardisation(self, X: torch.Tensor) -> None:
        """The training data's mean and std along `standardised_shape`'s axes."""
        dims = (0, *range(2, X.ndim)) if X.ndim >= 4 else (0,)
        mean = X.mean(dim=dims).reshape(self.mean.shape)
        std = X.std(dim=dims, unbiased=False).reshape(self.std.shape)
        self.mean.copy_(mean)
        self.std.copy_(torch.where(std > 1e-12, std, torch.ones_like(std)))

    def fix_standardisation(
        self, divisor: float, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> None:
        """A transform the network was trained behind, in place of a fitted one: it sees
        (x / divisor - mean) / std, as torchvision's ToTensor (divisor 255 on 8-bit
        images) and Normalize(mean, std) give it; mean and std hold one value, or one per
        channel of images (per feature of a table). None of them: the values as they are."""
        count = self.mean.shape[0] if self.mean.numel() == self.mean.shape[0] else 1
        for name, values in (("mean", mean), ("std", std)):
            if len(values) not in (0, 1, count):
                each = "channel" if self.mean.ndim > 1 else "feature"
                wanted = f"one, or one per {each} ({count})" if count > 1 else "one value"
                raise PumaError(
                    f"--normalize-{name} gives {len(values)} values; give {wanted} for "
                    f"this data's rows {tuple(self.arch.input_shape)}"
                )
        shape = (-1, *(1,) * (self.mean.ndim - 1))
        for buffer, values, default in ((self.mean, mean, 0.0), (self.std, std, 1.0)):
            given = torch.tensor(values or (default,), dtype=buffer.dtype) * divisor
            buffer.copy_(given.reshape(shape).expand(buffer.shape))


class ShardEnsemble(nn.Module):
    """SISA's aggregate: one Classifier per shard, predictions averaged.

    The logits are the log of the mean softmax over the active members, so cross-entropy,
    accuracy and calibration read the ensemble like any classifier. `active` (a buffer)
    is 0 for a shard whose every row was removed: it no longer votes.
    """

    active: torch.Tensor

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        member = replace(arch, shards=1)
        self.members = nn.ModuleList(Classifier(member) for _ in range(arch.shards))
        self.register_buffer("active", torch.ones(arch.shards))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.active / self.active.sum()
        probs = sum(
            w * torch.softmax(m(x), dim=1) for w, m in zip(weights, self.members, strict=True)
        )
        assert isinstance(probs, torch.Tensor)
        return torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))


Model = Classifier | ShardEnsemble


def build_model(arch: Architecture) -> Model:
    """A single Classifier, or a SISA ensemble when the architecture has shards."""
    if arch.shards < 1:
        raise CheckpointError(f"the recorded architecture has {arch.shards} shards")
    return ShardEnsemble(arch) if arch.shards > 1 else Classifier(arch)


def build_net(arch: Architecture) -> nn.Module:
    """The network the architecture names (built-in, or the user's class), not yet trained."""
    if arch.name == "user":
        if arch.source is None:
            raise PumaError("a user architecture needs its source file (FILE.py:Class)")
        cls = user_class(arch.source)
        return construct(cls, arch.args, arch.input_shape, arch.n_classes, arch.source.label)
    if arch.activation not in ACTIVATIONS:
        raise PumaError(f"unknown activation {arch.activation!r}; choose relu or sigmoid")
    if arch.name == "mlp":
        width = 1
        for size in arch.input_shape:
            width *= size
        return FlexibleFCN([width, *arch.hidden, arch.n_classes], arch.activation)
    if arch.name not in ARCHITECTURES:
        choices = ", ".join(ARCHITECTURES)
        raise PumaError(f"unknown architecture {arch.name!r}; choose {choices} or FILE.py:Class")
    if len(arch.input_shape) != 3:
        grey = ""
        if len(arch.input_shape) == 2 and min(arch.input_shape) >= 4:
            height, width = arch.input_shape  # MNIST as numpy and Keras keep it
            grey = (
                f" (grey images of {height}x{width}? save X[:, None], shape "
                f"(n, 1, {height}, {width}))"
            )
        raise PumaError(
            f"--arch {arch.name} needs image data (n, C, H, W); this data has shape "
            f"(n, {', '.join(map(str, arch.input_shape))}){grey}: use --arch mlp or your own "
            "FILE.py:Class"
        )
    if min(arch.input_shape[1:]) < 4:
        raise PumaError(f"--arch {arch.name} needs images of at least 4x4, not {arch.input_shape}")
    if arch.name == "cnn":
        hidden = arch.hidden[0] if arch.hidden else 64
        return SmallCNN(arch.input_shape, arch.channels, hidden, arch.n_classes)
    network = ResNet18 if arch.name == "resnet18" else DenseNet
    try:
        return network(arch.input_shape[0], arch.n_classes, **arch.args)
    except (TypeError, ValueError) as exc:
        raise PumaError(f"--arch-args for {arch.name}: {exc}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
