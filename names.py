"""The names the command lines offer as choices, in a module that imports nothing, so that every script's ``--help``
answers without loading torch, timm or albumentations.

Each registry is a plain dict in its own module beside its one ``create_*`` function; the tuple of the same name
here holds its keys, in its order (tests/test_help.py checks that they agree). The modes that are names alone, with
no registry behind them, are defined here once and imported where they are read.
"""

from __future__ import annotations

# Registries: the keys of augmentation.AUGMENTATIONS, loss.LOSSES, model.MODELS, train.OPTIMIZERS,
# train.SCHEDULERS, train.MONITORS and engine.TTA_MODES.
AUGMENTATIONS = ("none", "basic", "sketch", "strong")
LOSSES = ("ce", "label_smoothing", "focal", "f1")
MODELS = ("resnet18", "resnet50", "efficientnet_b0", "convnext_atto", "convnext_tiny", "convnext_base", "eva02_base",
          "eva02_large", "eva_giant")
OPTIMIZERS = ("adamw", "adam", "sgd", "lamb", "radam", "adan")
SCHEDULERS = ("cosine", "linear", "step", "constant")
MONITORS = ("val_acc", "val_f1", "val_loss")
TTA_MODES = ("none", "flip", "scales", "flip_scales")

# Modes: model.set_head's classifiers, engine.resolve_amp's precisions, dataset.ImageCache's places, the
# frozen-backbone feature cache's settings (features.cache_on) and what runs a prediction (inference.load_predictor).
HEADS = ("linear", "mlp")
AMP_MODES = ("auto", "bf16", "fp16", "none")
CACHE_MODES = ("none", "ram", "disk")
FEATURE_CACHE_MODES = ("auto", "on", "off")
ENGINES = ("torch", "onnxruntime")
