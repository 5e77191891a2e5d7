"""Target adapters: the only place that knows family-specific attribute paths and quirks.

Every supported vision-language model family gets one small adapter class behind the
[`TargetAdapter`] interface, registered by the `model_type` of its config. Everything else in
hf-dream talks to targets through an adapter.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

TARGET_ADAPTERS: dict[str, list[type[TargetAdapter]]] = {}


def register_target_adapter(cls: type[TargetAdapter]) -> type[TargetAdapter]:
    """Class decorator: make `cls` the adapter for every `model_type` in `cls.model_types`.

    Adapters registered later for the same model type are tried first, so a more specific
    adapter (e.g. Pixtral, which is a `llava` model with a Pixtral vision tower) can refine a
    generic one through [`TargetAdapter.matches`].
    """
    for model_type in cls.model_types:
        TARGET_ADAPTERS.setdefault(model_type, []).insert(0, cls)
    return cls


def supported_families() -> list[str]:
    """Sorted names of the model families that have a registered target adapter."""
    return sorted({cls.family for classes in TARGET_ADAPTERS.values() for cls in classes})


def get_target_adapter(model: nn.Module) -> TargetAdapter:
    """The adapter for `model`, or a `ValueError` that lists the supported families."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for cls in TARGET_ADAPTERS.get(model_type, []):
        if cls.matches(config):
            return cls(model)
    raise ValueError(
        f"hf-dream has no target adapter for model_type={model_type!r} "
        f"({type(model).__name__}). Supported families: {', '.join(supported_families())} "
        f"(model types: {', '.join(sorted(TARGET_ADAPTERS))})."
    )


class TargetAdapter:
    """What hf-dream needs from a target VLM, independent of its family.

    The defaults follow transformers 5 conventions (`get_decoder()`, `get_input_embeddings()`,
    `get_output_embeddings()`, `config.get_text_config()`, `config.image_token_id`); a family
    overrides only what differs.
    """

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.text_config = model.config.get_text_config()

    @classmethod
    def matches(cls, config) -> bool:
        """Whether this adapter handles `config` (one of its `model_types`); a more specific adapter narrows it down."""
        return True

    # --- structure -------------------------------------------------------------------------
    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.get_decoder().layers

    @property
    def num_hidden_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def image_token_id(self) -> int | None:
        for name in ("image_token_id", "image_token_index"):
            value = getattr(self.config, name, None)
            if value is not None:
                return int(value)
        return None

    @property
    def name_or_path(self) -> str | None:
        return getattr(self.config, "_name_or_path", None) or None

    # --- computation -----------------------------------------------------------------------
    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Text-token embeddings exactly as the target computes them (scaling included).

        Placeholder ids outside the text vocabulary (Gemma3's image token) are mapped to 0:
        image positions only occur in prompts, whose embeddings the drafter takes from the
        target's own prefill (images merged), never from this function.
        """
        safe_ids = input_ids.masked_fill(input_ids >= self.vocab_size, 0)
        return self.input_embeddings(safe_ids)

    def logits(self, features: torch.Tensor, rows: torch.LongTensor | None = None) -> torch.Tensor:
        """Token logits from last-layer (post-final-norm) features, as the target computes them;
        with `rows`, only those vocabulary entries (a reduced draft vocabulary), in that order."""
        if rows is None:
            logits = self.lm_head(features)
        else:
            weight, bias = self._lm_head_rows(rows)
            logits = torch.nn.functional.linear(features, weight, bias)
        softcap = getattr(self.text_config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def _lm_head_rows(self, rows: torch.LongTensor):
        # The target's lm_head is frozen while drafting and training: slice it once per id map.
        key = (rows.data_ptr(), rows.numel(), self.lm_head.weight.data_ptr(), self.lm_head.weight.dtype)
        if getattr(self, "_rows_key", None) != key:
            bias = getattr(self.lm_head, "bias", None)
            # detached: the lm_head is the target's, frozen; a cached slice must not carry a graph
            self._rows = (self.lm_head.weight[rows].detach(), None if bias is None else bias[rows].detach())
            self._rows_key = key
        return self._rows

    def image_token_mask(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        """True at positions holding image features (the placeholders the target replaces)."""
        image_token_id = self.image_token_id
        if image_token_id is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == image_token_id

    def describe(self) -> dict:
        """The facts a drafter records about its target (checked again at generate time)."""
        return {
            "target_model_type": self.config.model_type,
            "target_name_or_path": self.name_or_path,
            "target_num_hidden_layers": self.num_hidden_layers,
            "target_image_token_id": self.image_token_id,
            "target_build": self.build_id,
        }

    @property
    def build_id(self) -> str | None:
        """The target's build id, if its config records one (`hf_dream_reference_build`: the offline reference targets)."""
        return getattr(self.config, "hf_dream_reference_build", None)


@register_target_adapter
class LlavaAdapter(TargetAdapter):
    """LLaVA 1.5: CLIP vision tower + projector + Llama/Vicuna text model."""

    family = "llava"
    model_types = ("llava",)


@register_target_adapter
class PixtralAdapter(LlavaAdapter):
    """Pixtral: a `llava` model with a Pixtral vision tower (variable image sizes, [IMG_BREAK]
    and [IMG_END] tokens between rows, which are ordinary text tokens for the drafter)."""

    family = "pixtral"

    @classmethod
    def matches(cls, config) -> bool:
        return getattr(getattr(config, "vision_config", None), "model_type", None) == "pixtral"


@register_target_adapter
class LlavaNextAdapter(TargetAdapter):
    """LLaVA-NeXT (1.6): anyres tiling, a variable number of image tokens per image."""

    family = "llava_next"
    model_types = ("llava_next",)


@register_target_adapter
class Idefics3Adapter(TargetAdapter):
    """Idefics3 / SmolVLM: SigLIP-style encoder + pixel shuffle connector + Llama text model."""

    family = "idefics3"
    model_types = ("idefics3", "smolvlm")


@register_target_adapter
class Gemma3Adapter(TargetAdapter):
    """Gemma3: SigLIP + projector; embeddings scaled by sqrt(hidden) inside the embedding module;
    the image token id may lie outside the text vocabulary; generate() passes `token_type_ids`."""

    family = "gemma3"
    model_types = ("gemma3",)
