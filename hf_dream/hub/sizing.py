"""Sizing a drafter from a target known only by its configuration (nothing allocated)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedConfig

from ..configuration_dream import DreamConfig
from ..modeling_dream import DreamDraftModel


class ConfigOnlyTarget:
    """Stands in for a target model where only its config is known.

    Target adapters read sizes and ids from `model.config` only (`describe()`, `hidden_size`,
    `vocab_size`, ...), so a config-only stand-in is enough to size a drafter: no weights are
    allocated, even for a 13B target.
    """

    def __init__(self, config: PreTrainedConfig):
        self.config = config


def target_config_from_dict(config_dict: dict) -> PreTrainedConfig:
    """The transformers config class of a target (e.g. `LlavaConfig`) from its `config.json` dict."""
    values = dict(config_dict)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise ValueError("The target config has no `model_type`.")
    return AutoConfig.for_model(model_type, **values)


def _as_config(target_config: dict | PreTrainedConfig) -> PreTrainedConfig:
    return target_config if isinstance(target_config, PreTrainedConfig) else target_config_from_dict(target_config)


def dream_config_from_target_config(
    target_config: dict | PreTrainedConfig, target_name_or_path: str | None = None, **overrides
) -> DreamConfig:
    """A [`DreamConfig`] sized for a target known only by its configuration.

    Same values as `DreamDraftModel.config_for_target(target)` on the instantiated target (it is
    the same code, given a config-only stand-in), without allocating the target.
    `target_config` is the target's `config.json` as a dict, or a transformers config;
    `overrides` are `DreamConfig` fields.
    """
    if target_name_or_path is not None:
        overrides.setdefault("target_name_or_path", target_name_or_path)
    return DreamDraftModel.config_for_target(ConfigOnlyTarget(_as_config(target_config)), **overrides)


def _meta_drafter(config: DreamConfig) -> DreamDraftModel:
    with torch.device("meta"):
        return DreamDraftModel(config)


def drafter_parameter_count(config: DreamConfig) -> int:
    """Parameters of a drafter with `config`, counted on the meta device (nothing allocated)."""
    return sum(p.numel() for p in _meta_drafter(config).parameters())


def expected_drafter_tensors(config: DreamConfig) -> dict[str, tuple[int, ...]]:
    """`{name: shape}` of the tensors `save_pretrained` writes for a drafter with `config`."""
    return {name: tuple(tensor.shape) for name, tensor in _meta_drafter(config).state_dict().items()}


def target_parameter_count(target_config: dict | PreTrainedConfig) -> int:
    """Parameters of a target VLM, counted on the meta device from its config (nothing allocated)."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(_as_config(target_config))
    return sum(p.numel() for p in model.parameters())


def read_target_record(folder: str | Path) -> dict | None:
    """`target_config.json` of a drafter folder: `{"repo_id", "license", "source", "provenance",
    "image_tokens": {"typical", "basis"}, "config": <the target's config.json>}`, or None."""
    path = Path(folder) / "target_config.json"
    return json.loads(path.read_text()) if path.exists() else None
