"""Models: any timm model by name, with a new head for the class count, pretrained from the hub or a local file.

``MODELS`` maps short names to the timm models that did well on sketch classification (pretrained tags
included); any other name timm knows (``timm.list_models()``) works as it is. Pretrained weights come from the
Hugging Face hub (``--pretrained``) or from a local file (``--pretrained_path``: a timm/torchvision state dict,
safetensors, or a checkpoint of this suite). When the hub cannot be reached the error says so at once instead of
retrying for a minute.
"""

from __future__ import annotations

import difflib
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
from torch import nn

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


def resolve_model_name(name: str) -> str:
    """The timm model name for ``name`` (a key of MODELS or any timm name); ModelError with suggestions if unknown."""
    full = MODELS.get(name, name)
    arch = full.split(".")[0]
    if timm.is_model(arch):
        try:
            timm.models.get_pretrained_cfg(full)  # RuntimeError for a pretrained tag the architecture does not have
            return full
        except RuntimeError:
            tags = list(timm.models.get_arch_pretrained_cfgs(arch))
            close = difflib.get_close_matches(full, tags, n=5, cutoff=0.0)
            raise ModelError(f"--model {name!r}: {arch} has no pretrained tag {full.partition('.')[2]!r}"
                             + (f"; did you mean {', '.join(close)}?" if close else "")) from None
    close = difflib.get_close_matches(name, list(dict.fromkeys(list(MODELS) + timm.list_models())), n=5, cutoff=0.6)
    raise ModelError(f"--model {name!r}: not a timm model" + (f"; did you mean {', '.join(close)}?" if close else ""))


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


def create_model(name: str, num_classes: int, pretrained: bool = False, pretrained_path: str | None = None,
                 drop_rate: float = 0.0, drop_path_rate: float | None = None) -> nn.Module:
    """Build ``name`` with a ``num_classes`` head; weights random, from the hub, or from ``pretrained_path``."""
    full = resolve_model_name(name)
    kwargs: dict = {"num_classes": num_classes, "drop_rate": drop_rate}
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if pretrained_path is not None:
        path = Path(pretrained_path)
        if not path.is_file():
            raise ModelError(f"--pretrained_path {path}: file not found")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        source = str(path)
    elif pretrained:
        kwargs["pretrained"] = True
        source = "the hub"
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        address = _hub_address(full)
        if address is None:
            raise ModelError(f"--model {name}: timm has no pretrained weights for {full}; drop --pretrained")
        # Behind a proxy a direct connection proves nothing: leave the check to the hub client.
        proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
        if offline or (not proxied and not _hub_reachable(address)):
            # Fail in seconds rather than after a minute of retries; weights already cached still load. The hub
            # client reads HF_HUB_OFFLINE once at import, so set its constant too.
            import huggingface_hub.constants as hf_constants

            hf_constants.HF_HUB_OFFLINE = True
            source = "the local hub cache"
    else:
        source = None
    try:
        model = timm.create_model(full, **kwargs)
    except Exception as e:  # an unreadable file fails in many ways (EOFError, struct.error, SafetensorError...)
        if pretrained_path is not None:
            reason = (str(e).splitlines() or [""])[0][:200] or type(e).__name__
            raise ModelError(f"--pretrained_path {pretrained_path}: cannot load into {full} ({reason})") from None
        if source is not None and isinstance(e, (OSError, RuntimeError, ValueError, KeyError)):
            raise ModelError(f"--model {name}: pretrained weights for {full} cannot be fetched from {source} "
                             "(no connection to the hub); download them elsewhere and pass --pretrained_path FILE"
                             ) from None
        if isinstance(e, TypeError) and drop_path_rate is not None:  # models without stochastic depth
            raise ModelError(f"--drop_path: {full} does not take a stochastic depth rate") from None
        raise
    if source is not None:
        _logger.info("model %s: pretrained weights from %s", full, source)
    return model


def model_data_config(model: nn.Module) -> dict:
    """Normalization mean/std and the native input size of ``model`` (from its timm pretrained config)."""
    cfg = timm.data.resolve_data_config({}, model=model)
    return {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]), "input_size": tuple(cfg["input_size"])}


def has_depthwise_conv(model: nn.Module) -> bool:
    """True if the model uses depthwise convolutions (EfficientNet, MobileNet, ConvNeXt's 7x7 mixers...)."""
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules())


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
