"""DynamicCNN: a conv stack and an MLP head, built from plain values (never from a trial).

Each conv block is one conv (plain) or a residual basic block (two convs and a shortcut, as in
ResNet), then a 2x2 max-pool. The head flattens the last feature map, or averages it over space
(`pool = "avg"`, the pooled head of ResNets and wide ResNets), before the fully connected layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """Everything that shapes the network; the whole boundary of the model (hpo.params reads it from a trial)."""

    filters: tuple[int, ...]  # output channels of each conv block; len() is the number of blocks
    kernel_size: int = 3  # pixels, odd so that "same" padding keeps the size
    n_fc: int = 1  # hidden fully connected layers before the classifier
    fc_size: int = 128  # units per hidden FC layer
    dropout: float = 0.0  # after every hidden FC layer
    residual: bool = False  # each block: conv-BN-ReLU-conv-BN plus a shortcut, then ReLU
    pool: str = "flatten"  # head input: "flatten" the last feature map, or "avg" over its pixels
    in_channels: int = 1
    image_size: int = 28  # pixels per side
    num_classes: int = 10

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["filters"] = list(self.filters)
        return d

    def shaped(self, shape: InputShape) -> ModelSpec:
        """This network for images of `shape` (a trial's parameters say nothing of the data)."""
        return replace(self, in_channels=shape.channels, image_size=shape.size, num_classes=shape.classes)


@dataclass(frozen=True)
class InputShape:
    """What the data gives a model: channels and side of its images, and the number of classes."""

    channels: int = 1
    size: int = 28
    classes: int = 10


POOLS = ("flatten", "avg")


class ResidualBlock(nn.Module):
    """ResNet's basic block: two convs, each with BatchNorm, and a shortcut (a 1x1 conv when the
    width changes) added before the last ReLU."""

    def __init__(self, channels: int, width: int, kernel_size: int):
        super().__init__()
        pad = kernel_size // 2
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, kernel_size, padding=pad, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, kernel_size, padding=pad, bias=False),
            nn.BatchNorm2d(width),
        )
        self.shortcut: nn.Module = (
            nn.Identity()
            if channels == width
            else nn.Sequential(nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class DynamicCNN(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {spec.pool!r}")
        self.spec = spec
        blocks: list[nn.Module] = []
        channels, size = spec.in_channels, spec.image_size
        for width in spec.filters:
            if spec.residual:
                blocks.append(ResidualBlock(channels, width, spec.kernel_size))
            else:
                blocks += [
                    # No conv bias: BatchNorm's shift makes it redundant.
                    nn.Conv2d(channels, width, spec.kernel_size, padding=spec.kernel_size // 2, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
            blocks.append(nn.MaxPool2d(2))
            channels, size = width, size // 2
        if size < 1:
            raise ValueError(f"{len(spec.filters)} conv blocks shrink a {spec.image_size}px image below 1px")
        self.features = nn.Sequential(*blocks)
        head: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if spec.pool == "avg" else [nn.Flatten()]
        width = channels if spec.pool == "avg" else channels * size * size
        for _ in range(spec.n_fc):
            head += [nn.Linear(width, spec.fc_size), nn.ReLU(inplace=True), nn.Dropout(spec.dropout)]
            width = spec.fc_size
        head.append(nn.Linear(width, spec.num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Ensemble(nn.Module):
    """Members whose softmax outputs are averaged; with tta="flip", over each image and its mirror too.

    The output is the log of the averaged probabilities, so softmax, argmax and cross-entropy treat
    it as they treat one model's logits.
    """

    def __init__(self, members: Sequence[nn.Module], tta: str = "none"):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.tta = tta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = [x, x.flip(-1)] if self.tta == "flip" else [x]
        # log(mean(softmax)) as a logsumexp of log-softmaxes: no log(0) for a confident member.
        log_probs = torch.stack([m(v).float().log_softmax(1) for m in self.members for v in views])
        return torch.logsumexp(log_probs, 0) - math.log(len(log_probs))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cpu_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights, detached and on the CPU: what every hpo file stores."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def with_weights(spec: ModelSpec, state_dict: dict[str, torch.Tensor]) -> DynamicCNN:
    """The model `spec` describes, holding weights a file stored (`cpu_weights`)."""
    model = DynamicCNN(spec)
    model.load_state_dict(state_dict)
    return model
