"""Target adapters: the only place that knows family-specific attribute paths and quirks.

Every supported vision-language model family gets one small adapter class behind the
[`TargetAdapter`] interface, registered by the `model_type` of its config. Everything else in
hf-dream talks to targets through an adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class AttentionShape:
    """Head counts and size of a target's text attention, which a fresh drafter copies."""

    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int


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
    def attention_shape(self) -> AttentionShape:
        """The text model's attention heads (a family whose layers differ names the layers it means)."""
        text = self.text_config
        return AttentionShape(
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        )

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

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        """Placeholder ids whose positions the target fills with vision features (the image id;
        families with video add theirs)."""
        return () if self.image_token_id is None else (self.image_token_id,)

    def image_token_mask(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        """True at positions holding vision features (the placeholders of `visual_token_ids`,
        which the target replaces): the tokens visual-token compression ranks."""
        ids = self.visual_token_ids
        if not ids:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))

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


class _VideoPlaceholderMixin:
    """Families whose prompts may also hold video placeholders (`config.video_token_id`): their
    positions carry vision features too, so compression ranks them with the image tokens."""

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        video = getattr(self.config, "video_token_id", None)
        return super().visual_token_ids + (() if video is None else (int(video),))


@register_target_adapter
class Mistral3Adapter(TargetAdapter):
    """Mistral 3 (Mistral-Small-3.1 / 3.2): Pixtral vision tower, a patch merger (2x2 patches per
    token), Mistral text. As for Pixtral, [IMG_BREAK] / [IMG_END] are ordinary text tokens."""

    family = "mistral3"
    model_types = ("mistral3",)


@register_target_adapter
class LlavaOnevisionAdapter(_VideoPlaceholderMixin, TargetAdapter):
    """LLaVA-OneVision: SigLIP + anyres tiling (`anyres_max_9`) + image_newline, Qwen2 text;
    video frames are pooled into their own placeholders (`video_token_id`)."""

    family = "llava_onevision"
    model_types = ("llava_onevision",)


@register_target_adapter
class InternVLAdapter(TargetAdapter):
    """InternVL 3 (the `-hf` checkpoints, `InternVLForConditionalGeneration`): InternViT + pixel
    shuffle + MLP, Qwen2 text; `<img>` / `</img>` around each image's placeholders are text tokens."""

    family = "internvl"
    model_types = ("internvl",)


@register_target_adapter
class Gemma4Adapter(_VideoPlaceholderMixin, TargetAdapter):
    """Gemma 4: embeddings scaled inside the embedding module, per-layer embeddings (PLE, which the
    target computes from `input_ids` in every pass: the drafter needs none), sliding and full
    layers (the full ones with their own head size and keys reused as values), final-logit
    softcapping (applied by `logits`), bidirectional attention inside image blocks from
    `mm_token_type_ids` (a prefill-only input, as Gemma3's `token_type_ids`).

    Not supported: KV-shared layers (`num_kv_shared_layers > 0`) and fully bidirectional
    configs, refused here before any work (see `unsupported_reason`)."""

    family = "gemma4"
    model_types = ("gemma4",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        reason = self.unsupported_reason(self.text_config)
        if reason:
            raise ValueError(f"hf-dream cannot decode this Gemma 4 target: {reason}")

    @staticmethod
    def unsupported_reason(text_config) -> str | None:
        """Why a Gemma 4 text config cannot be a DREAM target, or None."""
        shared = getattr(text_config, "num_kv_shared_layers", 0) or 0
        if shared:
            return (
                f"num_kv_shared_layers={shared}: its last {shared} layers reuse the keys and values of earlier layers "
                "and keep no cache of their own (DummyLayer entries in the DynamicCache), which the verification "
                "engine cannot compact after a rejection, and the last layer has no key projection from which "
                "visual-token importance is recomputed."
            )
        if getattr(text_config, "use_bidirectional_attention", None) == "all":
            return "use_bidirectional_attention='all': every token attends to later ones, so it is no autoregressive decoder."
        return None

    @property
    def attention_shape(self) -> AttentionShape:
        """The sliding (local) layers' heads: most of Gemma 4's layers, and the ordinary head size
        (the few full layers have larger heads and fewer KV heads, read per layer)."""
        text = self.text_config
        index = text.layer_types.index("sliding_attention") if "sliding_attention" in text.layer_types else 0
        layer = text.per_layer_config[index]
        return AttentionShape(text.num_attention_heads, layer.num_key_value_heads, layer.head_dim)
