"""Frozen backbones: train the classifier head alone (or with the last blocks), and train a head on cached features.

The sketch competition's winners froze huge pretrained backbones and trained small heads over five folds. This
module gives the trainer that recipe (flags in main.py's "frozen backbone" group):

* :func:`freeze_backbone` (``--freeze_backbone``, ``--unfreeze_blocks N``): every parameter but the classifier's
  (and those of the last N blocks of timm's coarse grouping, ``model.group_matcher(coarse=True)``) stops
  training; modules left without a trainable parameter stay in eval mode in training too, so their batch-norm
  running statistics never change and their dropout and stochastic depth stay off.
* ``--head mlp`` (:func:`model.set_head`): Linear-GELU-Dropout-Linear on the pooled features, set where the
  linear classifier was, so checkpoints and prediction find it as the model's classifier.
* The feature cache (``--feature_cache``): with the whole backbone frozen, an image's pooled features
  (``forward_head(forward_features(x), pre_logits=True)`` in eval mode) never change, so they are extracted once
  per run into ``<run>/features/<key>/`` (``pool_v<k>.npy`` for the training images then any pseudo-labelled ones,
  ``test.npy``; each written atomically) and every fold, and any resume, reuses them. ``<key>`` hashes the
  backbone's weights and the settings that shape a feature (model, size, normalization, augmentation, seed,
  precision), so folds whose backbones differ (random weights drawn per fold) never share features. View 0 is
  the eval transform; views 1..K-1 (``--feature_views K``) are training augmentations, each image's seeded by
  (seed, view, image). Each epoch draws one of the K views per image from the sampler's seed for that image, so
  a resumed run draws the same views. ``auto`` turns the cache on unless something needs each step's pixels
  (``--unfreeze_blocks``, ``--mixup``/``--cutmix``, ``--tta``) or the run is spread over torchrun processes.
  Extraction has the crash point ``feature_step`` (faults.py), one visit per batch.

:func:`head_on_features` swaps a fold's loaders, network and EMA for their cached-feature counterparts; the
trainer's own epoch loop (optimizer, schedule, loss, accumulation, early stopping, EMA, snapshots, checkpoints,
metrics) then runs unchanged. The frozen weights are written once, as ``features/<key>/backbone.pth``; each epoch's
``last.pth`` holds the trained head alone with ``backbone`` naming that file (a few kB instead of the whole model,
which dominated a head epoch's time), and ``checkpoints.load_checkpoint`` merges the two. When the fold is finished its
``best.pth`` and snapshot checkpoints are written whole (frozen backbone plus the trained head, and ``head`` naming
its kind), so whatever rebuilds a model with ``model.create_model(..., head=ckpt["head"])`` predicts with them as
with any other, wherever they are copied.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
import types
from pathlib import Path

import numpy as np
import timm
import timm.utils
import torch
from torch import nn
from tqdm import tqdm

import checkpoints
import engine
import faults
import runfiles
from dataset import ImageCache, ImageDataset, Table
from fileio import atomic_write, write_json
from folds import training_split
from model import ModelError
from seed import derive_seed

_logger = logging.getLogger(__name__)

BACKBONE = "backbone.pth"  # the frozen model's state dict, beside its features
_VIEW_SEED = 0xFEA7  # keeps the augmented views' seeds apart from every other seed derived from --seed


# ----------------------------------------------------------------------------------------------- freezing
def classifier_name(model: nn.Module) -> str:
    """The attribute path of the model's classifier (``fc``, ``head``, ``head.fc``...), found by identity."""
    classifier = model.get_classifier()
    for name, module in model.named_modules():
        if module is classifier and name:
            return name
    raise ModelError(f"{type(model).__name__}: its classifier is not one of its modules")


def block_groups(model: nn.Module) -> tuple[list[list[str]], list[str]]:
    """The model's parameter names in timm's coarse groups from input to output (the stem, then each block or
    stage) without the classifier's, and the names of the group holding the classifier (a head norm beside it)."""
    if not hasattr(model, "group_matcher"):
        raise ModelError(f"--unfreeze_blocks: {type(model).__name__} does not group its layers into blocks")
    prefix = classifier_name(model) + "."
    groups = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    blocks, tail = [], []
    for key in sorted(groups):
        names = list(groups[key])
        if any(n.startswith(prefix) for n in names):
            tail += [n for n in names if not n.startswith(prefix)]
        else:
            blocks.append(names)
    return blocks, tail


def _train_keeping_frozen_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    # Bound to a frozen model as its train(): modules without a trainable parameter stay in eval mode.
    type(self).train(self, mode)
    for name in self._frozen_modules:
        self.get_submodule(name).train(False)
    return self


def freeze_backbone(model: nn.Module, unfreeze_blocks: int = 0) -> None:
    """Train only the classifier, and the last ``unfreeze_blocks`` groups of ``model.group_matcher(coarse=True)``
    (with whatever follows them before the classifier); ModelError if the model has fewer groups.

    Modules left with no trainable parameter are kept in eval mode by the model's ``train()``, so frozen batch
    norms keep their running statistics and the frozen part computes what it computes at prediction time.
    """
    prefix = classifier_name(model) + "."
    trainable = {n for n, _ in model.named_parameters() if n.startswith(prefix)}
    if unfreeze_blocks > 0:
        blocks, tail = block_groups(model)
        if unfreeze_blocks > len(blocks):
            arch = model.pretrained_cfg.get("architecture", type(model).__name__)
            raise ModelError(f"--unfreeze_blocks {unfreeze_blocks}: {arch} has {len(blocks)} blocks (its stem "
                             "counted as the first)")
        trainable |= set(tail) | {n for group in blocks[-unfreeze_blocks:] for n in group}
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    frozen: list[str] = []
    for name, module in model.named_modules():  # parents come before their children: keep the top-most only
        if not name or any(name.startswith(f + ".") for f in frozen):
            continue
        params = list(module.parameters())
        has_state = bool(params) or any(True for _ in module.buffers())
        if has_state and not any(p.requires_grad for p in params):
            frozen.append(name)
    model._frozen_modules = tuple(frozen)
    model.train = types.MethodType(_train_keeping_frozen_eval, model)  # deep copies (the EMA) rebind it
    model.train(model.training)
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _logger.info("frozen backbone: %s of %s parameters train (the classifier%s)", f"{trained:,}", f"{total:,}",
                 f" and the last {unfreeze_blocks} block(s)" if unfreeze_blocks else "")


# ----------------------------------------------------------------------------------------------- when to cache
def cache_conflict(args: argparse.Namespace, world: int = 1) -> str | None:
    """Why the feature cache cannot serve this run, or None: the backbone must be frozen whole, and nothing may
    need each step's pixels."""
    if not args.freeze_backbone:
        return "it needs --freeze_backbone (features change while the backbone trains)"
    if args.unfreeze_blocks > 0:
        return f"the {args.unfreeze_blocks} block(s) --unfreeze_blocks trains need the pixels of each step"
    if args.mixup > 0 or args.cutmix > 0:
        return "--mixup/--cutmix mix the pixels of each batch"
    if args.tta != "none":
        return f"--tta {args.tta} predicts from views made of pixels"
    if world > 1:
        return "torchrun: the cache is made and used by one process"
    return None


def cache_on(args: argparse.Namespace, world: int = 1) -> bool:
    """Whether a fold trains its head on cached features: ``--feature_cache on``, or ``auto`` where it can."""
    return args.feature_cache != "off" and cache_conflict(args, world) is None


# ----------------------------------------------------------------------------------------------- the cached head
class FeatureHead(nn.Module):
    """The part of the model after its pooled features: the dropout before the classifier (``--drop_rate``, as
    timm applies it in ``forward_head``) and the model's own classifier module, shared, so training this trains the
    model. Input: features shaped (B, D, 1, 1), which pass the trainer's image code paths unchanged."""

    def __init__(self, classifier: nn.Module, drop_rate: float):
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(x.flatten(1)))


class _EmaFeatureHead(FeatureHead):
    """The averaged classifier on features, whose state dict is the full model's with this classifier in it."""

    def __init__(self, classifier: nn.Module, drop_rate: float, model: nn.Module, prefix: str):
        super().__init__(classifier, drop_rate)
        self._model = (model,)  # a tuple: the frozen model is not a submodule of this head
        self._prefix = prefix

    def state_dict(self, *args, **kwargs) -> dict:
        state = self._model[0].state_dict()
        state.update({f"{self._prefix}.{k}": v for k, v in self.classifier.state_dict().items()})
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        start = len(self._prefix) + 1
        own = {k[start:]: v for k, v in state_dict.items() if k.startswith(self._prefix + ".")}
        return self.classifier.load_state_dict(own, strict=strict, assign=assign)


class HeadEma:
    """The weight EMA of a frozen-backbone model, kept for its classifier alone: the backbone never changes, so
    the full model's average is the backbone plus this one (exactly: the average of equal values is that value).
    Has what the trainer uses of ``timm.utils.ModelEmaV3``: ``update(model, step)``, ``decay``, and ``module``,
    which predicts from features and saves and loads the full model's state dict."""

    def __init__(self, ema: timm.utils.ModelEmaV3, model: nn.Module, drop_rate: float):
        prefix = classifier_name(model)
        # Starts from the full EMA's classifier: the model's own, or the averaged one a resumed fold loaded.
        self._ema = timm.utils.ModelEmaV3(ema.module.get_submodule(prefix), decay=ema.decay,
                                          use_warmup=ema.use_warmup)
        self.decay = ema.decay
        self.module = _EmaFeatureHead(self._ema.module, drop_rate, model, prefix).eval()

    def update(self, model: nn.Module, step: int | None = None) -> None:
        self._ema.update(model.get_classifier(), step=step)


class FeatureLoader:
    """Batches of cached features (B, D, 1, 1) with their targets, as a DataLoader of images would give them.

    ``feats``: (K, N, D), K views of N images on the training device; ``rows``: the row of each item of this split;
    with a SeededSampler (training), items come in its order and each uses view ``seed % K`` of its (index, seed)
    pairs, else in order from view 0. ``dataset``: what ``loader.dataset`` answers (its length counts the items).
    """

    def __init__(self, feats: torch.Tensor, rows: np.ndarray, targets: np.ndarray | None, batch_size: int,
                 sampler=None, drop_last: bool = False, dataset=None):
        self.feats = feats
        self.rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        self.targets = torch.full((len(self.rows),), -1, dtype=torch.long) if targets is None else \
            torch.as_tensor(np.asarray(targets), dtype=torch.long)
        self.batch_size, self.sampler, self.drop_last = batch_size, sampler, drop_last
        self.dataset = range(len(self.rows)) if dataset is None else dataset

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.rows)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        if self.sampler is None:
            items = torch.arange(len(self.rows))
            views = torch.zeros(len(items), dtype=torch.long)
        else:
            pairs = list(self.sampler)
            items = torch.tensor([i for i, _ in pairs], dtype=torch.long)
            views = torch.tensor([s % self.feats.shape[0] for _, s in pairs], dtype=torch.long)
        device = self.feats.device
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            i = items[start : start + self.batch_size]
            x = self.feats[views[start : start + self.batch_size].to(device), self.rows[i].to(device)]
            yield x[:, :, None, None], self.targets[i]


# ----------------------------------------------------------------------------------------------- extraction
def backbone_key(model: nn.Module, settings: dict) -> str:
    """A hash of the frozen backbone's weights (every state-dict entry but the classifier's) and ``settings``."""
    skip = classifier_name(model) + "."
    h = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=8)
    for name, value in model.state_dict().items():
        if name.startswith(skip):
            continue
        h.update(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.inference_mode()
def extract(model: nn.Module, loader, device: torch.device, amp_dtype, channels_last: bool,
            desc: str = "features") -> np.ndarray:
    """Pooled features (N, D) float32 of every image of ``loader``, the model in eval mode.

    The first batch checks that the classifier on these features gives the model's own logits, so a model whose
    head does more than its classifier (a distillation head, say) is refused rather than trained wrongly.
    """
    model.eval()
    classifier = model.get_classifier()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    for images, _ in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        with engine.autocast(device, amp_dtype):
            maps = model.forward_features(images)
            feats = model.forward_head(maps, pre_logits=True)
            if not out:
                expected, got = model.forward_head(maps).float(), classifier(feats).float()
                if expected.shape != got.shape or not torch.allclose(expected, got, rtol=1e-3, atol=1e-3):
                    raise ModelError(f"--feature_cache: {type(model).__name__}'s head does more than its classifier "
                                     "on the pooled features; use --feature_cache off")
        out.append(feats.float().cpu().numpy())
        faults.point("feature_step")
    return np.concatenate(out)


def _view_seeds(seed: int, view: int, n: int) -> list[tuple[int, int]]:
    # (index, seed) items for ImageDataset: image i's augmentation in view k depends on (seed, k, i) alone.
    return [(i, derive_seed(seed, _VIEW_SEED, view, i)) for i in range(n)]


def _load(path: Path, rows: int) -> np.ndarray | None:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):  # absent, or not a complete .npy: extract again
        return None
    return arr if arr.ndim == 2 and arr.shape[0] == rows and arr.dtype == np.float32 else None


def cached_features(args: argparse.Namespace, t: argparse.Namespace, pool_paths: list[str], test: Table,
                    run_dir: Path, device: torch.device,
                    caches: tuple[ImageCache | None, ImageCache | None] = (None, None),
                    ) -> tuple[np.ndarray, np.ndarray, Path]:
    """The pool's features (K, N, D) (training images, then any pseudo-labelled ones) and the test images' (T, D),
    read from ``run_dir/features/<key>/`` or extracted there first, one atomically written file per view; and the
    backbone file beside them (:data:`BACKBONE`), written once, which the head's checkpoints refer to."""
    model, img_size, norm = t.model, t.img_size, t.norm
    settings = {"model": args.model, "img_size": list(img_size), "norm": norm,
                "aug": args.aug, "seed": args.seed, "precision": str(t.amp_dtype),
                "channels_last": args.channels_last,
                "pool": hashlib.blake2b("\n".join(pool_paths).encode(), digest_size=8).hexdigest(),
                "test": hashlib.blake2b("\n".join(test.paths).encode(), digest_size=8).hexdigest()}
    folder = runfiles.RunFiles(run_dir).feature_dir(backbone_key(model, settings))
    for stale in folder.glob(".*.tmp"):  # a write that a kill cut short; its file is extracted again below
        stale.unlink()
    if not (folder / BACKBONE).exists():  # the frozen weights, once, instead of in every epoch's checkpoint
        checkpoints.save_checkpoint(model.state_dict(), folder / BACKBONE)
    train_cache, test_cache = caches
    jobs = [(f"pool_v{k}.npy", k) for k in range(args.feature_views)] + [("test.npy", None)]
    arrays, extracted = {}, []
    for name, view in jobs:
        rows = len(test.paths) if view is None else len(pool_paths)
        arr = _load(folder / name, rows)
        if arr is None:
            start = time.perf_counter()
            if view is None:
                ds = ImageDataset(test.paths, None, t.eval_transform, img_size, test_cache)
                sampler = None
            else:
                ds = ImageDataset(pool_paths, None, t.eval_transform if view == 0 else t.train_transform, img_size,
                                  train_cache, np.arange(len(pool_paths)))
                sampler = None if view == 0 else _view_seeds(args.seed, view, len(pool_paths))
            loader = engine.make_loader(ds, args.eval_batch_size, args.num_workers, device, sampler=sampler)
            arr = extract(model, loader, device, t.amp_dtype, args.channels_last, desc=f"features {name}")
            with atomic_write(folder / name, "wb") as f:
                np.save(f, arr)
            extracted.append(name)
            _logger.info("features: %s, %d images x %d extracted in %.1f s", folder / name, rows, arr.shape[1],
                         time.perf_counter() - start)
        arrays[name] = arr
    if extracted:
        write_json({**settings, "views": args.feature_views, "dim": int(arrays["test.npy"].shape[1]),
                    "files": sorted(arrays)}, folder / "meta.json")
    else:
        _logger.info("features: reusing %s (%d view(s) of %d images, %d test images)", folder, args.feature_views,
                     len(pool_paths), len(test.paths))
    pool = np.stack([arrays[f"pool_v{k}.npy"] for k in range(args.feature_views)])
    return pool, arrays["test.npy"], folder / BACKBONE


# ----------------------------------------------------------------------------------------------- one fold
def head_on_features(args: argparse.Namespace, t: argparse.Namespace, ema, loaders: argparse.Namespace,
                     table: Table, folds: np.ndarray, fold: int, test: Table, run_dir: Path, device: torch.device,
                     caches: tuple[ImageCache | None, ImageCache | None] = (None, None),
                     pseudo: Table | None = None) -> tuple[nn.Module, object, argparse.Namespace, Path]:
    """The network, EMA and loaders a fold trains with on cached features, in place of the pixel ones: the model's
    head on features, an EMA of the head alone, loaders of the fold's features (``train`` in the order of the
    pixel loaders' SeededSampler, ``val`` and ``test()`` from view 0), and the backbone file the fold's checkpoints
    refer to (see :func:`head_state`). Call it once the model holds the weights the fold starts from (a resumed
    fold's checkpoint loaded)."""
    model = t.model
    pool_paths = list(table.paths) + ([] if pseudo is None else list(pseudo.paths))
    pool, test_feats, backbone = cached_features(args, t, pool_paths, test, run_dir, device, caches)
    pool, test_feats = torch.from_numpy(pool).to(device), torch.from_numpy(test_feats)[None].to(device)
    split = training_split(args, table, folds, fold, pseudo)
    val_idx = np.flatnonzero(folds == fold)
    feature_loaders = argparse.Namespace(
        sampler=loaders.sampler,
        train=FeatureLoader(pool, split.ids, split.targets, args.batch_size, loaders.sampler, drop_last=True,
                            dataset=loaders.train.dataset),
        val=FeatureLoader(pool[:1], val_idx, table.targets[val_idx], args.eval_batch_size,
                          dataset=loaders.val.dataset),
        test=lambda: FeatureLoader(test_feats, np.arange(len(test.paths)), None, args.eval_batch_size),
    )
    net = FeatureHead(model.get_classifier(), args.drop_rate)
    if ema is not None:
        ema = HeadEma(ema, model, args.drop_rate)
        t.ema = None  # the full model's copy is not needed any more
    _logger.info("fold %d: the head trains on cached features (%d view(s), %d wide)", fold, pool.shape[0],
                 pool.shape[2])
    return net, ema, feature_loaders, backbone


def head_state(model: nn.Module, state: dict) -> dict:
    """The entries of the full model's ``state`` that a cached-feature fold trains: the classifier's.

    Everything else is the frozen backbone, the same at every epoch, so each epoch's checkpoint holds these entries
    with ``backbone`` naming the backbone file (relative to the checkpoint's folder); ``checkpoints.load_checkpoint``
    merges the two, and a finished fold's best and snapshot checkpoints are written whole again."""
    prefix = classifier_name(model) + "."
    return {k: v for k, v in state.items() if k.startswith(prefix)}
