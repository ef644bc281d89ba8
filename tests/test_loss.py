"""Tests for loss.py: shared behaviour of every registered loss, then exact values against manual formulas."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

# Make the repository root importable however pytest is invoked.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loss import LOSSES, CrossEntropy, FocalLoss, SoftF1Loss, create_loss  # noqa: E402

B, C = 12, 4


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, hard targets covering every class, and mixup-style soft targets."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, generator=g)
    hard = torch.arange(B) % C
    lam = 0.7
    soft = lam * F.one_hot(hard, C).float() + (1 - lam) * F.one_hot(hard.roll(1), C).float()
    return logits, hard, soft


def test_registry_keys() -> None:
    assert set(LOSSES) == {"ce", "label_smoothing", "focal", "f1"}


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_finite_scalar_with_gradient(name: str, kind: str) -> None:
    logits, hard, soft = _batch()
    logits.requires_grad_(True)
    loss = create_loss(name, C)(logits, hard if kind == "hard" else soft)
    assert loss.ndim == 0 and loss.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(LOSSES))
def test_hard_equals_one_hot(name: str) -> None:
    logits, hard, _ = _batch()
    fn = create_loss(name, C)
    torch.testing.assert_close(fn(logits, hard), fn(logits, F.one_hot(hard, C).float()))


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_bf16_autocast(name: str, kind: str) -> None:
    logits, hard, soft = _batch()
    target = hard if kind == "hard" else soft
    logits = logits.bfloat16().requires_grad_(True)
    fn = create_loss(name, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fn(logits, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # Computed in float32, so it equals the float32 loss of the same (bf16-rounded) logits.
    torch.testing.assert_close(loss, fn(logits.detach().float(), target))
    loss.backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16
    assert torch.isfinite(logits.grad.float()).all()


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_decreases_under_sgd(name: str, kind: str) -> None:
    logits, hard, soft = _batch()
    target = hard if kind == "hard" else soft
    logits = torch.nn.Parameter(logits)
    fn = create_loss(name, C)
    opt = torch.optim.SGD([logits], lr=1.0)
    start = fn(logits, target).item()
    for _ in range(10):
        opt.zero_grad()
        fn(logits, target).backward()
        opt.step()
    assert fn(logits, target).item() < start


def test_ce_matches_manual() -> None:
    logits, hard, soft = _batch()
    log_p = logits - logits.exp().sum(dim=1, keepdim=True).log()
    torch.testing.assert_close(create_loss("ce", C)(logits, hard), -log_p[torch.arange(B), hard].mean())
    torch.testing.assert_close(create_loss("ce", C)(logits, soft), -(soft * log_p).sum(dim=1).mean())


@pytest.mark.parametrize("s", [0.1, 0.3])
def test_label_smoothing_matches_manual(s: float) -> None:
    logits, hard, soft = _batch()
    fn = create_loss("label_smoothing", C, smoothing=s)
    log_p = logits - logits.exp().sum(dim=1, keepdim=True).log()
    nll = -log_p[torch.arange(B), hard]
    expected = ((1 - s) * nll + s * (-log_p).mean(dim=1)).mean()
    torch.testing.assert_close(fn(logits, hard), expected)
    expected_soft = ((1 - s) * -(soft * log_p).sum(dim=1) + s * (-log_p).mean(dim=1)).mean()
    torch.testing.assert_close(fn(logits, soft), expected_soft)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_focal_gamma_zero_is_ce(kind: str) -> None:
    logits, hard, soft = _batch()
    target = hard if kind == "hard" else soft
    torch.testing.assert_close(FocalLoss(C, gamma=0.0)(logits, target), CrossEntropy(C)(logits, target))


def _softmax(row: list[float]) -> list[float]:
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


def test_focal_gamma_two_hand_example() -> None:
    rows = [[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]]
    targets = [0, 2]
    ps = [_softmax(r) for r in rows]
    expected = sum((1 - p[t]) ** 2 * -math.log(p[t]) for p, t in zip(ps, targets)) / 2
    logits = torch.tensor(rows)
    fn = create_loss("focal", 3)
    torch.testing.assert_close(fn(logits, torch.tensor(targets)).item(), expected)

    soft = [[0.7, 0.3, 0.0], [0.0, 0.2, 0.8]]
    expected_soft = sum(y * (1 - pc) ** 2 * -math.log(pc) for p, ys in zip(ps, soft) for pc, y in zip(p, ys)) / 2
    torch.testing.assert_close(fn(logits, torch.tensor(soft)).item(), expected_soft)


def test_f1_perfect_predictions_near_zero() -> None:
    hard = torch.arange(B) % C
    logits = 30.0 * F.one_hot(hard, C).float()
    assert create_loss("f1", C)(logits, hard).item() < 1e-4


def test_f1_hand_example() -> None:
    rows = [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    targets = [0, 1, 0]
    ps = [_softmax(r) for r in rows]
    f1s = []
    for c in range(2):
        tp = sum(p[c] for p, t in zip(ps, targets) if t == c)
        fp = sum(p[c] for p, t in zip(ps, targets) if t != c)
        fn = sum(1 - p[c] for p, t in zip(ps, targets) if t == c)
        f1s.append(2 * tp / (2 * tp + fp + fn))
    expected = 1 - sum(f1s) / 2
    got = create_loss("f1", 2)(torch.tensor(rows), torch.tensor(targets)).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_create_loss_defaults() -> None:
    assert create_loss("ce", C).smoothing == 0.0
    assert create_loss("label_smoothing", C).smoothing == 0.1
    assert create_loss("focal", C).gamma == 2.0
    assert isinstance(create_loss("f1", C), SoftF1Loss)
    assert all(create_loss(name, 7).num_classes == 7 for name in LOSSES)


def test_create_loss_passes_arguments_through() -> None:
    logits, hard, _ = _batch()
    ls_a = create_loss("label_smoothing", C, smoothing=0.05)
    ls_b = create_loss("label_smoothing", C, smoothing=0.4)
    assert (ls_a.smoothing, ls_b.smoothing) == (0.05, 0.4)
    assert not torch.isclose(ls_a(logits, hard), ls_b(logits, hard))

    fo_a = create_loss("focal", C, focal_gamma=1.0)
    fo_b = create_loss("focal", C, focal_gamma=3.0)
    assert (fo_a.gamma, fo_b.gamma) == (1.0, 3.0)
    assert not torch.isclose(fo_a(logits, hard), fo_b(logits, hard))

    # Plain cross-entropy takes no smoothing.
    torch.testing.assert_close(create_loss("ce", C, smoothing=0.4)(logits, hard), F.cross_entropy(logits, hard))


@pytest.mark.parametrize("name", list(LOSSES))
def test_num_classes_mismatch_raises(name: str) -> None:
    logits, hard, _ = _batch()
    with pytest.raises(ValueError, match="shape"):
        create_loss(name, C + 1)(logits, hard)


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError) as info:
        create_loss("hinge", C)
    assert "hinge" in str(info.value)
    assert all(name in str(info.value) for name in LOSSES)
