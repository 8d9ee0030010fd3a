"""What a training recipe does to each batch and each epoch beside the optimiser step:
random flips and crops of images (`--augment`), mixup and CutMix (`--mixup`, `--cutmix`),
and the learning rate's schedule (`--lr-schedule`). The CIFAR recipe the unlearning
literature trains ResNet-18 with uses flips, crops and a cosine schedule; timm's and
torchvision's newer recipes mix pairs of rows too. A retrain that left them out would not
be the retrain of that model.

Draws come from the training's own generator, so the same seed gives the same bytes; a
recipe without augmentation draws nothing, and trains as it did before these existed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

AUGMENTS = ("none", "flip", "crop", "flip-crop")
LR_SCHEDULES = ("constant", "cosine", "step")
STEP_AT = (0.5, 0.75)  # `step`: the rate divided by STEP_FACTOR at these shares of the epochs
STEP_FACTOR = 10.0
WARMUP_START = 0.01  # `--lr-warmup-epochs`: the first epoch's share of the rate


def crop_padding(side: int) -> int:
    """Pixels of zero padding a random crop may shift by: an eighth of the side, at least
    one (4 on 32x32 images, the CIFAR recipe's; 1 on 8x8)."""
    return max(1, round(side / 8))


def augment_batch(X: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """A batch of images (b, C, H, W), each flipped left-right with probability 1/2
    (`flip`) and/or cut from the image padded with zeros to a random offset of the same
    size (`crop`); `none` returns X itself. A new tensor: X is never written."""
    if kind == "none":
        return X
    b, channels, height, width = X.shape
    if "flip" in kind:
        flip = (torch.rand(b, generator=generator) < 0.5).to(X.device)
        X = torch.where(flip[:, None, None, None], X.flip(3), X)
    if "crop" in kind:
        ph, pw = crop_padding(height), crop_padding(width)
        padded = F.pad(X, (pw, pw, ph, ph))
        dy = torch.randint(0, 2 * ph + 1, (b,), generator=generator).to(X.device)
        dx = torch.randint(0, 2 * pw + 1, (b,), generator=generator).to(X.device)
        row = torch.arange(b, device=X.device)[:, None, None, None]
        channel = torch.arange(channels, device=X.device)[None, :, None, None]
        ys = (dy[:, None] + torch.arange(height, device=X.device))[:, None, :, None]
        xs = (dx[:, None] + torch.arange(width, device=X.device))[:, None, None, :]
        X = padded[row, channel, ys, xs]  # (b, C, H, W): each row's own window
    return X


def mix_batch(
    X: torch.Tensor, mixup: float, cutmix: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Each row of the batch mixed with a partner row of the same batch (a random
    permutation): `mixup` alpha blends the two, lam X + (1 - lam) X[partner]; `cutmix`
    alpha pastes a box of the partner's image over the row's (b, C, H, W), lam then the
    share of the image left the row's own; with both, each batch takes one of the two at
    random, even odds (timm's default). lam ~ Beta(alpha, alpha), one per batch (as in
    Zhang et al. and Yun et al.). The training loss is then lam x the loss on the row's
    label + (1 - lam) x the loss on the partner's. Returns the mixed batch (a new tensor:
    X is never written), the partners' positions and lam. Draws come from `generator`."""
    b = X.shape[0]
    use_cutmix = cutmix > 0 and (mixup <= 0 or float(torch.rand(1, generator=generator)) < 0.5)
    alpha = cutmix if use_cutmix else mixup
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    draws = np.random.default_rng(seed)
    lam = float(draws.beta(alpha, alpha))
    partner = torch.randperm(b, generator=generator).to(X.device)
    if not use_cutmix:
        return lam * X + (1 - lam) * X[partner], partner, lam
    height, width = X.shape[-2:]
    side = math.sqrt(1 - lam)  # the box's share of each side
    h, w = int(height * side), int(width * side)
    cy, cx = int(draws.integers(height)), int(draws.integers(width))
    top, bottom = max(cy - h // 2, 0), min(cy + h // 2, height)
    left, right = max(cx - w // 2, 0), min(cx + w // 2, width)
    mixed = X.clone()
    mixed[..., top:bottom, left:right] = X[partner][..., top:bottom, left:right]
    return mixed, partner, 1 - (bottom - top) * (right - left) / (height * width)


def lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, epochs: int, warmup: int = 0
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The schedule, stepped once an epoch: `cosine` anneals the rate from the recipe's to
    0 over `epochs` (torch's CosineAnnealingLR); `step` divides it by 10 after half and
    after three quarters of them (He et al.'s CIFAR ResNet recipe; SalUn's 182 epochs
    step at 91 and 136); `constant` keeps it (None). With `warmup` W, the rate first rises
    linearly from WARMUP_START of the recipe's over W epochs (torchvision's reference
    recipes' `linear` warmup) and the schedule runs over the epochs left; a SISA slice,
    fewer epochs than the recipe, keeps at least its last at the full rate."""
    warmup = max(0, min(warmup, epochs - 1))
    main = _schedule(optimizer, schedule, epochs - warmup)
    if warmup == 0:
        return main
    rise = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=WARMUP_START, end_factor=1.0, total_iters=warmup
    )
    if main is None:
        return rise  # past its W epochs LinearLR keeps the recipe's rate
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [rise, main], milestones=[warmup])


def _schedule(
    optimizer: torch.optim.Optimizer, schedule: str, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if schedule == "step":
        at = sorted({round(share * epochs) for share in STEP_AT})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, at, gamma=1 / STEP_FACTOR)
    return None
