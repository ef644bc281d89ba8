"""Classification losses and their registry.

Every loss takes logits ``[B, C]`` and targets that are either hard class indices (int64 ``[B]``) or soft class
probabilities (float ``[B, C]``, as mixup and cutmix produce), and returns the mean over the batch as a scalar.
Losses are computed in float32 even under bf16 autocast: log-softmax, powers and ratios lose too much in bf16.

Use :func:`create_loss` to build one by name; :data:`LOSSES` maps each name to its factory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LOSSES", "CrossEntropy", "FocalLoss", "SoftF1Loss", "create_loss"]


def _check_logits(logits: Tensor, num_classes: int) -> None:
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"expected logits of shape [B, {num_classes}], got {list(logits.shape)}")


def _is_hard(target: Tensor) -> bool:
    return target.ndim == 1 and not target.is_floating_point()


def _soft_targets(target: Tensor, logits: Tensor, num_classes: int) -> Tensor:
    """Return float32 class probabilities ``[B, C]`` for hard or soft ``target``."""
    if _is_hard(target):
        return F.one_hot(target, num_classes).float()
    if target.shape != logits.shape:
        raise ValueError(f"soft targets must match logits shape {list(logits.shape)}, got {list(target.shape)}")
    return target.float()


class CrossEntropy(nn.Module):
    """Cross-entropy with optional label smoothing, for hard or soft targets.

    For soft targets ``F.cross_entropy`` smooths as ``y * (1 - s) + s / C``, the same as for hard ones.
    """

    def __init__(self, num_classes: int, smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.num_classes = num_classes
        self.smoothing = smoothing

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_logits(logits, self.num_classes)
        if not _is_hard(target):
            target = _soft_targets(target, logits, self.num_classes)
        return F.cross_entropy(logits.float(), target, label_smoothing=self.smoothing)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, smoothing={self.smoothing}"


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017): ``sum_c y_c (1 - p_c)^gamma (-log p_c)``, averaged over the batch.

    ``p = softmax(logits)``; ``y`` is the one-hot or soft target. ``gamma = 0`` is plain cross-entropy.
    """

    def __init__(self, num_classes: int, gamma: float = 2.0) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.num_classes = num_classes
        self.gamma = gamma

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_logits(logits, self.num_classes)
        y = _soft_targets(target, logits, self.num_classes)
        log_p = F.log_softmax(logits.float(), dim=1)
        loss = -log_p
        if self.gamma != 0:
            # -expm1(log p) is 1 - p without the cancellation of 1 - exp(log p) when p is near 1.
            loss = loss * (-torch.expm1(log_p)).pow(self.gamma)
        return (y * loss).sum(dim=1).mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, gamma={self.gamma}"


class SoftF1Loss(nn.Module):
    """``1 - `` soft macro-F1, with counts taken from softmax probabilities over the batch.

    Per class: ``tp = sum_b y p``, ``fp = sum_b (1 - y) p``, ``fn = sum_b y (1 - p)`` and
    ``f1 = 2 tp / (2 tp + fp + fn + eps)``; the loss is ``1 - mean_c f1``. Being a batch statistic, it is only as
    good as the batch is large enough to hold every class.
    """

    def __init__(self, num_classes: int, eps: float = 1e-7) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.eps = eps

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_logits(logits, self.num_classes)
        y = _soft_targets(target, logits, self.num_classes)
        p = F.softmax(logits.float(), dim=1)
        tp = (y * p).sum(dim=0)
        fp = ((1 - y) * p).sum(dim=0)
        fn = (y * (1 - p)).sum(dim=0)
        f1 = 2 * tp / (2 * tp + fp + fn + self.eps)
        return 1 - f1.mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, eps={self.eps}"


# Factories take every create_loss argument by keyword and use the ones that concern them.
def _ce(*, num_classes: int, **_: object) -> nn.Module:
    return CrossEntropy(num_classes, smoothing=0.0)


def _label_smoothing(*, num_classes: int, smoothing: float = 0.1, **_: object) -> nn.Module:
    return CrossEntropy(num_classes, smoothing=smoothing)


def _focal(*, num_classes: int, focal_gamma: float = 2.0, **_: object) -> nn.Module:
    return FocalLoss(num_classes, gamma=focal_gamma)


def _f1(*, num_classes: int, **_: object) -> nn.Module:
    return SoftF1Loss(num_classes)


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ce": _ce,
    "label_smoothing": _label_smoothing,
    "focal": _focal,
    "f1": _f1,
}


def create_loss(name: str, num_classes: int, smoothing: float = 0.1, focal_gamma: float = 2.0) -> nn.Module:
    """Build the loss registered as ``name``; ``smoothing`` feeds label_smoothing, ``focal_gamma`` feeds focal."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(sorted(LOSSES))}")
    return LOSSES[name](num_classes=num_classes, smoothing=smoothing, focal_gamma=focal_gamma)
