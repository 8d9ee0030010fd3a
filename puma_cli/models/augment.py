"""What a training recipe does to each batch and each epoch beside the optimiser step:
random flips and crops of images (`--augment`), and the learning rate's schedule
(`--lr-schedule`). The CIFAR recipe the unlearning literature trains ResNet-18 with uses
both (a random 4-pixel crop and a horizontal flip, a cosine schedule); a retrain that
left them out would not be the retrain of that model.

Draws come from the training's own generator, so the same seed gives the same bytes; a
recipe without augmentation draws nothing, and trains as it did before these existed.
"""

from __future__ import annotations

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
