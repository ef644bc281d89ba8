"""Models: any timm model by name, with a new head for the class count, pretrained from the hub or a local file.

``MODELS`` maps short names to the timm models that did well on sketch classification (pretrained tags
included); any other name timm knows (``timm.list_models()``) works as it is. Pretrained weights come from the
Hugging Face hub (``--pretrained``) or from a local file (``--pretrained_path``: a timm/torchvision state dict,
safetensors, or a checkpoint of this suite). When the hub cannot be reached the error says so at once instead of
retrying for a minute; ``tf_efficientnet_lite0/1/2`` then load from an installed offline package (the extra
``pretrained-offline``, see weights.py) unless the hub's local cache holds their weights.

Pretrained weights are checked tensor by tensor, by name and shape, after timm's own key conversions: one log line
says how many of the model's tensors they filled (``model X: N of M tensors from FILE (the classifier's K
replaced)``), and weights that leave part of the backbone unfilled (or a file holding tensors the model does not
have) are refused in one line naming the source, the count and the first such tensor, unless a partial load is
asked for (``allow_partial``, the trainer's ``--partial_weights``). The classifier may always be replaced.

Stacking: ``stack:A+B`` (two or more names joined by ``+``, each a key of MODELS or a timm name, e.g.
``--model stack:convnext_atto+vit_tiny_patch16_224.augreg_in21k_ft_in1k``) is one model: every backbone is built
headless (``num_classes=0``, pooled features out), and a single ``Linear(sum of their num_features, num_classes)``
behind dropout reads the concatenated features. See :class:`StackedModel` for what each flag does to it.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

import weights
from names import HEADS

_logger = logging.getLogger(__name__)

MODELS: dict[str, str] = {
    # Fast baselines.
    "resnet18": "resnet18.a1_in1k",
    "resnet50": "resnet50.a1_in1k",
    "efficientnet_b0": "efficientnet_b0.ra_in1k",
    "convnext_atto": "convnext_atto.d2_in1k",
    "convnext_tiny": "convnext_tiny.fb_in22k_ft_in1k",
    # The sketch competition's strongest backbones (448 px / 336 px).
    "convnext_base": "convnext_base.fb_in22k_ft_in1k_384",
    "eva02_base": "eva02_base_patch14_448.mim_in22k_ft_in22k_in1k",
    "eva02_large": "eva02_large_patch14_448.mim_m38m_ft_in22k_in1k",
    "eva_giant": "eva_giant_patch14_336.clip_ft_in1k",
}


class ModelError(ValueError):
    """A model that cannot be built as asked: unknown name, unreachable or unreadable weights."""


STACK_PREFIX = "stack:"


def stack_parts(name: str) -> list[str] | None:
    """The backbone names of a ``stack:A+B`` model name, as written; None for a single model."""
    return name[len(STACK_PREFIX):].split("+") if name.startswith(STACK_PREFIX) else None


def _resolve_single(name: str, where: str) -> str:
    """The timm name of one model; ``where`` starts the error message (the flag, and the part of a stack)."""
    full = MODELS.get(name, name)
    arch = full.split(".")[0]
    if timm.is_model(arch):
        try:
            timm.models.get_pretrained_cfg(full)  # RuntimeError for a pretrained tag the architecture does not have
            return full
        except RuntimeError:
            tags = list(timm.models.get_arch_pretrained_cfgs(arch))
            close = difflib.get_close_matches(full, tags, n=5, cutoff=0.0)
            raise ModelError(f"{where}: {arch} has no pretrained tag {full.partition('.')[2]!r}"
                             + (f"; did you mean {', '.join(close)}?" if close else "")) from None
    close = difflib.get_close_matches(name, list(dict.fromkeys(list(MODELS) + timm.list_models())), n=5, cutoff=0.6)
    raise ModelError(f"{where}: not a timm model" + (f"; did you mean {', '.join(close)}?" if close else ""))


def resolve_model_name(name: str) -> str:
    """The timm model name for ``name`` (a key of MODELS or any timm name); ModelError with suggestions if unknown.

    A stack resolves part by part (``stack:convnext_atto+resnet18`` -> ``stack:convnext_atto.d2_in1k+resnet18.a1_in1k``)
    and an unknown part is named in the error.
    """
    parts = stack_parts(name)
    if parts is None:
        return _resolve_single(name, f"--model {name!r}")
    if len(parts) < 2 or not all(parts):
        raise ModelError(f"--model {name!r}: a stack needs two or more model names joined by '+' (stack:NAME+NAME)")
    return STACK_PREFIX + "+".join(_resolve_single(p, f"--model {name!r}: part {p!r}") for p in parts)


def _hub_address(full_name: str) -> tuple[str, int] | None:
    """(host, port) the pretrained weights of ``full_name`` come from, or None if timm has none."""
    cfg = timm.models.get_pretrained_cfg(full_name, allow_unregistered=True)
    if cfg is not None and cfg.hf_hub_id:
        url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    elif cfg is not None and cfg.url:
        url = urlparse(cfg.url)
    else:
        return None
    return url.hostname or "", url.port or (80 if url.scheme == "http" else 443)


def _hub_reachable(address: tuple[str, int], timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(address, timeout=timeout):
            return True
    except OSError:
        return False


def _weights_file(path: str) -> str:
    """``path`` if it is a file, else ModelError."""
    if not Path(path).is_file():
        raise ModelError(f"--pretrained_path {path}: file not found")
    return path


def create_model(name: str, num_classes: int, pretrained: bool = False, pretrained_path: str | Path | None = None,
                 drop_rate: float = 0.0, drop_path_rate: float | None = None, head: str = "linear",
                 allow_partial: bool = False) -> nn.Module:
    """Build ``name`` with a ``num_classes`` head; weights random, from the hub, or from ``pretrained_path``.

    ``head``: ``linear`` (timm's own classifier) or ``mlp`` (see :func:`set_head`); a checkpoint records it.

    Pretrained weights (hub or file) must fill every tensor of the backbone, by name and shape; the classifier may be
    replaced (its tensors missing, or of another class count). One log line says how many of the model's tensors
    they filled. Weights that leave a backbone tensor unfilled, or a file holding tensors the model does not have,
    are a ModelError naming the source, the count and the first such tensor, unless ``allow_partial``
    (``--partial_weights``): then whatever fits by name and shape loads, with a warning line.

    For a stack (``stack:A+B``), ``pretrained`` loads every backbone's hub weights, and ``pretrained_path`` is either
    one checkpoint of the whole stacked model (a trainer checkpoint such as ``fold_0/best.pth``, or its state dict)
    or one file per backbone joined by ``+`` in the stack's order (each what ``--pretrained_path`` takes for that
    backbone alone); a file path that itself contains ``+`` is read as the whole-stack checkpoint. The same rule
    holds for each backbone and for the whole-stack checkpoint.
    """
    if head != "linear":  # built with the linear classifier, which is then replaced
        return set_head(create_model(name, num_classes, pretrained, pretrained_path, drop_rate, drop_path_rate,
                                     allow_partial=allow_partial), head, drop_rate)
    full = resolve_model_name(name)
    parts = stack_parts(full)
    pretrained_path = None if pretrained_path is None else str(pretrained_path)  # main.py passes a Path
    if parts is None:
        file = None if pretrained_path is None else _weights_file(pretrained_path)
        return _create_timm(full, name, {"num_classes": num_classes, "drop_rate": drop_rate}, pretrained, file,
                            drop_path_rate, allow_partial=allow_partial)
    whole, files = None, [None] * len(parts)
    if pretrained_path is not None:
        if Path(pretrained_path).is_file() or "+" not in pretrained_path:
            whole = _weights_file(pretrained_path)
        else:
            files = pretrained_path.split("+")
            if len(files) != len(parts):
                raise ModelError(f"--pretrained_path {pretrained_path}: {len(files)} files for a stack of "
                                 f"{len(parts)} backbones; give one per backbone joined by '+', or one checkpoint "
                                 "of the whole stack")
            files = [_weights_file(f) for f in files]
    # The backbones' own head dropout stays off: the stack's classifier applies drop_rate once.
    backbones = [_create_timm(part, name, {"num_classes": 0, "drop_rate": 0.0}, pretrained and whole is None, file,
                              drop_path_rate, stacked=True, allow_partial=allow_partial)
                 for part, file in zip(parts, files, strict=True)]
    model = StackedModel(backbones, num_classes, drop_rate, name=full)
    if whole is not None:
        _load_stack_checkpoint(model, whole, full, allow_partial)
    return model


def _weights_source(full: str, name: str, pretrained: bool, file: str | None, kwargs: dict) -> str | None:
    """Where the weights of ``full`` come from, for messages (None: random); sets timm's arguments in ``kwargs``.

    For the hub: ModelError when timm has no weights for the model; with the hub offline or unreachable, timm is
    told to read the local cache alone, so a missing download fails in seconds rather than after retries.
    """
    if file is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(Path(file))})
        return file
    if not pretrained:
        return None
    kwargs["pretrained"] = True
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    address = _hub_address(full)
    if address is None:
        raise ModelError(f"--model {name}: timm has no pretrained weights for {full}; drop --pretrained")
    # Behind a proxy a direct connection proves nothing: leave the check to the hub client.
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if offline or (not proxied and not _hub_reachable(address)):
        # Weights already cached still load. The hub client reads HF_HUB_OFFLINE once at import, so set its
        # constant too.
        import huggingface_hub.constants as hf_constants

        hf_constants.HF_HUB_OFFLINE = True
        # Unless the hub cache holds them, weights of an installed offline package (the extra pretrained-offline:
        # tf_efficientnet_lite0/1/2) load instead, mapped into timm's layout (see weights.py).
        try:
            local = weights.offline_weights(full)
        except weights.WeightsError as e:
            raise ModelError(f"--model {name}: offline weights for {full}: {e}") from None
        if local is not None:
            kwargs["pretrained_cfg_overlay"] = {"file": str(local.path)}
            return local.source
        return "the local hub cache"
    return "the hub"


def _create_timm(full: str, name: str, kwargs: dict, pretrained: bool, file: str | None,
                 drop_path_rate: float | None, stacked: bool = False, allow_partial: bool = False) -> nn.Module:
    """One timm model ``full`` (``name``: what --model says, for messages), weights from ``file``, the hub or none.

    ``stacked``: a backbone of a stack, built with ``dynamic_img_size=True`` where the architecture has it (ViTs),
    so it takes any input size. The weights are checked as :func:`create_model` says.
    """
    kwargs = dict(kwargs)
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    source = _weights_source(full, name, pretrained, file, kwargs)
    offered: dict = {}
    try:
        with _recorded_load(offered):
            model = None
            if stacked:
                try:
                    model = timm.create_model(full, dynamic_img_size=True, **kwargs)
                except TypeError as e:  # not a ViT-style model: its input size is free anyway
                    if "dynamic_img_size" not in str(e):
                        raise
            if model is None:
                model = timm.create_model(full, **kwargs)
    except Exception as e:  # an unreadable file fails in many ways (EOFError, struct.error, SafetensorError...)
        if file is not None:
            raise ModelError(f"--pretrained_path {file}: cannot load into {full} ({_first_line(e)})") from None
        if source is not None and isinstance(e, (OSError, RuntimeError, ValueError, KeyError)):
            raise ModelError(f"--model {name}: pretrained weights for {full} cannot be fetched from {source} "
                             "(no connection to the hub); download them elsewhere and pass --pretrained_path FILE"
                             + (f", or {hint}" if (hint := weights.install_hint(full.split(".")[0])) else "")
                             + (" (for a stack: one file per backbone joined by '+', or a checkpoint of the whole "
                                "stack)" if stacked else "")) from None
        if isinstance(e, TypeError) and drop_path_rate is not None:  # models without stochastic depth
            raise ModelError(f"--drop_path: {full} does not take a stochastic depth rate") from None
        raise
    if source is not None:
        refusal = (f"--pretrained_path {file}: cannot load into {full}" if file is not None
                   else f"--model {name}: the pretrained weights from {source} cannot load into {full}")
        # timm's own hub weights may hold tensors a model variant drops (an unused attention pool): not refused.
        _check_fill(model, offered.get("shapes"), full, source, refusal, allow_partial, extra=file is not None)
    return model


# timm's loaders log every step at INFO; the fill line of _check_fill says what matters in one line.
_TIMM_LOGGERS = ("timm.models._builder", "timm.models._helpers")
_LOADING = threading.RLock()


@contextlib.contextmanager
def _quiet_timm() -> Iterator[None]:
    """timm's loading loggers at WARNING while open (one load at a time: the lock is held)."""
    with _LOADING:
        loggers = [logging.getLogger(n) for n in _TIMM_LOGGERS]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


@contextlib.contextmanager
def _recorded_load(record: dict) -> Iterator[None]:
    """While open, a model timm builds with pretrained weights loads them through :func:`_fitting_weights`, and
    ``record["shapes"]`` gets the name and shape of every tensor offered.

    timm's ``load_pretrained`` reads the file or download, applies the architecture's own key conversions
    (``pretrained_filter_fn``: renamed keys, resampled position embeddings), adapts the input convolution, drops the
    classifier when the class count differs, and hands the result to ``model.load_state_dict``: that last call is
    where the tensors are counted, so the count is of what timm really offers, after its conversions.
    """
    builder = timm.models._builder
    original = builder.load_pretrained

    def load_pretrained(model: nn.Module, *args, **kwargs) -> None:
        def load_state_dict(state_dict, strict: bool = True, assign: bool = False):
            record["shapes"] = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
            return type(model).load_state_dict(model, _fitting_weights(model, state_dict), strict=False, assign=assign)

        model.load_state_dict = load_state_dict  # this instance only, for this one call
        try:
            original(model, *args, **kwargs)
        finally:
            del model.load_state_dict

    with _quiet_timm():
        builder.load_pretrained = load_pretrained
        try:
            yield
        finally:
            builder.load_pretrained = original


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier")
    return (names,) if isinstance(names, str) else tuple(names or ())


def _in(key: str, modules: tuple[str, ...]) -> bool:
    return any(key == m or key.startswith(m + ".") for m in modules)


def _fitting_weights(model: nn.Module, state: dict) -> dict:
    """The tensors of ``state`` that ``model`` has by name and shape; the classifier's only if all of it fits (a
    classifier of another class count is left whole to its fresh initialisation)."""
    own = model.state_dict()
    fits = {k: v for k, v in state.items()
            if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(own[k].shape)}
    head = [k for k in own if _in(k, _classifier_names(model))]
    if not all(k in fits for k in head):
        fits = {k: v for k, v in fits.items() if k not in head}
    return fits


@dataclass
class WeightsFill:
    """How far weights (tensor names and shapes) fill a model; see :func:`weights_fill`."""

    total: int  # the model's tensors
    needed: int  # of those, the ones the weights must fill (all but a replaceable classifier's)
    filled: int  # the model's tensors the weights hold by name and shape
    replaced: int  # classifier tensors the weights do not hold: a fresh classifier
    missing: list[str] = field(default_factory=list)  # needed tensors not held: "name", or with both shapes
    extra: list[str] = field(default_factory=list)  # tensors of the weights the model does not have

    def problems(self, extra: bool = True) -> list[str]:
        """What the weights lack (and, with ``extra``, what they hold beyond the model), each with a count."""
        out = []
        if self.missing:
            out.append(f"{len(self.missing)} of its {self.needed} {'backbone ' if self.needed < self.total else ''}"
                       f"tensors missing or of another shape, first: {self.missing[0]}")
        if extra and self.extra:
            out.append(f"{len(self.extra)} {'tensor' if len(self.extra) == 1 else 'tensors'} not in the model, "
                       f"first: {self.extra[0]}")
        return out

    def summary(self, full: str, source: str) -> str:
        """``model X: N of M tensors from SOURCE (the classifier's K replaced)``."""
        return (f"model {full}: {self.filled} of {self.total} tensors from {source}"
                + (f" (the classifier's {self.replaced} replaced)" if self.replaced else ""))


def weights_fill(model: nn.Module, shapes: dict[str, tuple[int, ...]], replace_head: bool = True,
                 counters: bool = False) -> WeightsFill:
    """How far weights whose tensors have these names and ``shapes`` fill ``model``'s state dict.

    ``replace_head``: the classifier (``pretrained_cfg['classifier']``) need not be filled, and tensors under its
    name that the model lacks (another head's) are not extra. ``counters``: BatchNorm's ``num_batches_tracked``
    counts too (it is no weight, and files often lack it, so by default it is left out on both sides).
    """
    def counted(k: str) -> bool:
        return counters or not k.endswith("num_batches_tracked")

    own = {k: tuple(v.shape) for k, v in model.state_dict().items() if counted(k)}
    head = _classifier_names(model) if replace_head else ()
    shapes = {k: tuple(v) for k, v in shapes.items() if counted(k)}
    fitting = _fitting_weights(model, {k: torch.empty(v, device="meta") for k, v in shapes.items()})
    filled = [k for k in own if k in fitting]
    unfilled = [k for k in own if k not in fitting and not _in(k, head)]
    # Named first: the tensors the weights lack, then those of another shape, then those left out with them (a
    # module loads whole or not at all).
    missing = ([k for k in unfilled if k not in shapes]
               + [f"{k} (weights {list(shapes[k])}, model {list(own[k])})" for k in unfilled
                  if k in shapes and shapes[k] != own[k]]
               + [f"{k} (its module is incomplete)" for k in unfilled if k in shapes and shapes[k] == own[k]])
    return WeightsFill(
        total=len(own), needed=sum(not _in(k, head) for k in own), filled=len(filled),
        replaced=sum(_in(k, head) and k not in fitting for k in own), missing=missing,
        extra=[k for k in shapes if k not in own and not _in(k, head)])


def _check_fill(model: nn.Module, shapes: dict | None, full: str, source: str, refusal: str, allow_partial: bool,
                extra: bool = True) -> None:
    """Log how far the weights offered (``shapes``) filled ``model``; ModelError ``refusal (why); ...`` where they
    fall short (``extra``: or hold tensors the model lacks), unless ``allow_partial``."""
    if shapes is None:
        if not model.pretrained_cfg.get("custom_load"):  # timm loaded them some other way: nothing was counted
            raise ModelError(f"{refusal} (the weights did not pass through the model's load_state_dict, so what "
                             "they fill is unknown)")
        # A model that reads its own format (timm's custom_load, .npz) names each tensor it reads.
        _logger.info("model %s: pretrained weights from %s (read by the model's own loader)", full, source)
        return
    fill = weights_fill(model, shapes)
    problems = fill.problems(extra)
    if problems and not allow_partial:
        raise ModelError(f"{refusal} ({'; '.join(problems)}); pass --partial_weights if a partial load is meant")
    if problems:
        _logger.warning("%s; %s; loaded anyway (--partial_weights)", fill.summary(full, source), "; ".join(problems))
    else:
        _logger.info("%s", fill.summary(full, source))


def _first_line(e: Exception) -> str:
    """The gist of an exception in one line (torch's "Error(s) in loading state_dict for X:" with its next line)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines or [""])[0]
    return text[:200] or type(e).__name__


def _load_stack_checkpoint(model: StackedModel, path: str, full: str, allow_partial: bool = False) -> None:
    """Load a checkpoint of a whole stacked model into ``model``; a head of another class count is left fresh."""
    refusal = f"--pretrained_path {path}: cannot load into {full}"
    try:
        # timm's reader: weights only (never runs code from the file), a trainer checkpoint's "model" entry.
        with _quiet_timm():
            state = dict(timm.models.load_state_dict(path, weights_only=True))
        model.load_state_dict(_fitting_weights(model, state), strict=False)
    except Exception as e:  # an unreadable or foreign file fails in many ways
        raise ModelError(f"{refusal} ({_first_line(e)})") from None
    shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    _check_fill(model, shapes, full, path, refusal, allow_partial)


class _Renormalize(nn.Module):
    """An image normalized with one mean/std, re-expressed with another (a fixed per-channel affine map)."""

    def __init__(self, mean_from, std_from, mean_to, std_to) -> None:
        super().__init__()
        mean_from, std_from, mean_to, std_to = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                                                for v in (mean_from, std_from, mean_to, std_to))
        # Fixed by the architectures' configs, so not saved: a checkpoint holds only the learned weights.
        self.register_buffer("scale", std_from / std_to, persistent=False)
        self.register_buffer("shift", (mean_from - mean_to) / std_to, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class StackedModel(nn.Module):
    """Backbones side by side on the same image; one linear classifier over their concatenated pooled features.

    - The backbones are timm models built headless (``num_classes=0``); ``drop_path_rate`` (stochastic depth)
      goes to each of them, ``drop_rate`` only to the dropout before the shared classifier.
    - Input normalization and native input size are the first backbone's (what ``model_data_config`` reports); a
      later backbone pretrained with another mean/std (a CLIP-normalized EVA beside an ImageNet ConvNeXt) maps the
      input to its own normalization first, so each sees what its weights expect.
    - ViT-style backbones take any input size (``dynamic_img_size``), so the stack runs at the trainer's
      ``--resize_height/--resize_width`` whatever the backbones' native sizes.
    - ``forward_features`` returns one feature tensor per backbone (maps and token sequences differ in shape);
      ``forward_head(features, pre_logits=True)`` returns the concatenated pooled features, ``num_features`` wide.
    - ``state_dict`` keys: ``backbones.<i>.<that backbone's own keys>``, ``head.weight``, ``head.bias``.
    """

    def __init__(self, backbones: list[nn.Module], num_classes: int, drop_rate: float = 0.0,
                 name: str = "stack") -> None:
        super().__init__()
        self.backbones = nn.ModuleList(backbones)
        first = dict(backbones[0].pretrained_cfg)
        self.renorms = nn.ModuleList(
            nn.Identity() if _same_normalization(first, b.pretrained_cfg)
            else _Renormalize(first["mean"], first["std"], b.pretrained_cfg["mean"], b.pretrained_cfg["std"])
            for b in backbones
        )
        # Width of each backbone's pooled output: head_hidden_size where a head layer follows the pooling
        # (MobileNetV3's conv_head), else num_features.
        self.num_features = self.head_hidden_size = sum(
            getattr(b, "head_hidden_size", None) or b.num_features for b in backbones)
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        keep = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
        self.pretrained_cfg = {"architecture": name, "num_classes": num_classes, "classifier": "head",
                               **{k: first[k] for k in keep if k in first}}

    @property
    def default_cfg(self) -> dict:
        """timm's older name for ``pretrained_cfg``."""
        return self.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        """The shared linear classifier."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier for ``num_classes`` (0: none, the forward returns pooled features)."""
        if global_pool is not None:
            raise ValueError("a stacked model keeps each backbone's own pooling; global_pool must be None")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        """The backbones' own no-weight-decay parameters (position embeddings, class tokens...), as named here."""
        return {f"backbones.{i}.{n}" for i, b in enumerate(self.backbones)
                for n in (b.no_weight_decay() if hasattr(b, "no_weight_decay") else ())}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in every backbone."""
        for b in self.backbones:
            b.set_grad_checkpointing(enable)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each backbone's unpooled features of ``x``, in order."""
        return tuple(b.forward_features(r(x)) for b, r in zip(self.backbones, self.renorms, strict=True))

    def forward_head(self, features: tuple[torch.Tensor, ...], pre_logits: bool = False) -> torch.Tensor:
        """Pool each backbone's features, concatenate, then classify (``pre_logits``: return the concatenation)."""
        pooled = torch.cat([b.forward_head(f, pre_logits=True) for b, f in zip(self.backbones, features, strict=True)],
                           dim=1)
        pooled = self.head_drop(pooled)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _same_normalization(a: dict, b: dict) -> bool:
    return all(abs(float(x) - float(y)) < 1e-6 for key in ("mean", "std") for x, y in zip(a[key], b[key], strict=True))


def set_head(model: nn.Module, head: str, drop_rate: float = 0.0) -> nn.Module:
    """``model`` with its linear classifier replaced by ``head``: ``mlp`` is Linear(D, D)-GELU-Dropout(drop_rate)-
    Linear(D, classes) on the same pooled features, set where ``pretrained_cfg['classifier']`` names the classifier,
    so ``get_classifier()``, checkpoints and prediction find it as they find a linear one."""
    if head == "linear":
        return model
    if head not in HEADS:
        raise ModelError(f"--head {head!r}: not one of {', '.join(HEADS)}")
    name = model.pretrained_cfg.get("classifier")
    old = model.get_classifier()
    if not isinstance(name, str) or not isinstance(old, nn.Linear) or model.get_submodule(name) is not old:
        raise ModelError(f"--head {head}: {model.pretrained_cfg.get('architecture', type(model).__name__)} has no "
                         "single linear classifier to replace")
    width = old.in_features
    model.set_submodule(name, nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Dropout(drop_rate),
                                            nn.Linear(width, old.out_features)))
    return model


def model_data_config(model: nn.Module) -> dict:
    """Normalization mean/std and the native input size of ``model`` (from its timm pretrained config).

    For a stacked model: the first backbone's; the others re-normalize inside the model (see StackedModel).
    """
    cfg = timm.data.resolve_data_config({}, model=model)
    return {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]), "input_size": tuple(cfg["input_size"])}


def has_depthwise_conv(model: nn.Module) -> bool:
    """True if the model uses depthwise convolutions (EfficientNet, MobileNet, ConvNeXt's 7x7 mixers...)."""
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules())


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
