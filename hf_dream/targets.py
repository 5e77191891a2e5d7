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

from .configuration_dream import default_entropy_candidate_layers

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


def token_type_keys() -> tuple[str, ...]:
    """Every registered family's token-type inputs ([`TargetAdapter.token_type_keys`]), for code that handles
    prepared data of any family (padding, slicing a prompt)."""
    return tuple(dict.fromkeys(key for classes in TARGET_ADAPTERS.values() for cls in classes for key in cls.token_type_keys))


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


@dataclass
class TargetPositions:
    """The target's own rotary position ids for a batch of prompts, and where every later token sits.

    The one source of positions in decoding: the drafter's rotary embedding (prompt tokens, the visual
    tokens kept after compression, drafted tokens, tree nodes) and the target's verification passes
    both read them from here, so the drafter places every token exactly where the target does.

    Args:
        prompt: `(axes, rows, width)` position ids of every prompt column, laid out as `input_ids`
            (left padding included; padding columns are never read). One axis for 1-D rotary
            targets; three (temporal, height, width) for M-RoPE targets (Qwen2.5-VL, Qwen3-VL),
            whose visual tokens get 3-D grid positions and whose text after an image continues
            from the image's largest index.
        deltas: `(axes, rows)`: the token at a row's (unpadded) sequence index `p`, from its prompt
            length on, sits at position `p + deltas[:, row]` on every axis. This is generate()'s
            own rule (the last prompt position plus one per token, per axis), so for M-RoPE it
            holds the rope deltas (`0` for a 1-D target without explicit offsets).
    """

    prompt: torch.LongTensor
    deltas: torch.LongTensor

    @classmethod
    def from_prompt(cls, prompt: torch.LongTensor, prompt_mask: torch.Tensor) -> TargetPositions:
        """From the prompt's position ids `(axes, rows, width)` of left-padded prompts (`prompt_mask (rows, width)`)."""
        return cls(prompt, prompt[..., -1] + 1 - prompt_mask.sum(dim=-1).to(prompt.device))

    @property
    def axes(self) -> int:
        return self.prompt.shape[0]

    def after_prompt(self, indices: torch.LongTensor, row: int | None = None) -> torch.LongTensor:
        """`(axes, rows, n)` positions of tokens at unpadded sequence indices `indices (rows, n)` at or
        after the prompt (every row of the batch, or `row` for every row of `indices`)."""
        deltas = self.deltas if row is None else self.deltas[:, row : row + 1]
        return indices[None] + deltas[..., None].to(indices.device)

    def select_rows(self, rows: torch.LongTensor) -> TargetPositions:
        """Only `rows`, in that order (finished rows leave the batch)."""
        rows = rows.to(self.prompt.device)
        return TargetPositions(self.prompt.index_select(1, rows), self.deltas.index_select(1, rows))


def position_ids_for_model(positions: torch.LongTensor) -> torch.LongTensor:
    """`(axes, rows, n)` positions as a target's (or the drafter's) forward takes them: `(rows, n)` for one axis."""
    return positions[0] if positions.shape[0] == 1 else positions


class TargetAdapter:
    """What hf-dream needs from a target VLM, independent of its family.

    The defaults follow transformers 5 conventions (`get_decoder()`, `get_input_embeddings()`,
    `get_output_embeddings()`, `config.get_text_config()`, `config.image_token_id`); a family
    overrides only what differs.
    """

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    # rotary position axes: 1, or 3 for M-RoPE (temporal, height, width)
    rotary_axes: ClassVar[int] = 1
    # M-RoPE frequency layout: consecutive chunks per axis (Qwen2/2.5-VL) or interleaved t,h,w,... (Qwen3-VL)
    mrope_interleaved: ClassVar[bool] = False
    # inputs aligned with the token sequence that mark each token's kind (text 0, image, video), as the
    # processor returns them: padded with 0 along the sequence, and 0 (text) for generated tokens
    token_type_keys: ClassVar[tuple[str, ...]] = ()

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

    # a blank picture in the processor's normalised pixel space: a uniform light grey, one standard deviation above
    # the processor's mean colour (white for SmolVLM's mean 0.5 / std 0.5)
    blank_pixel_value: ClassVar[float] = 1.0

    def blank_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`pixel_values` with every picture blank (`blank_pixel_value`), for `drafter_image="blank"`."""
        return torch.full_like(pixel_values, self.blank_pixel_value)

    @property
    def mrope_section(self) -> list[int] | None:
        """Rotary frequencies per position axis (temporal, height, width) for an M-RoPE target; None for 1-D rotary."""
        return None

    def entropy_candidate_layers(self) -> list[int]:
        """Target layers among which entropy-adaptive supervision picks, per token, the first draft block's target."""
        return default_entropy_candidate_layers(self.num_hidden_layers)

    # --- positions ---------------------------------------------------------------------------
    def rotary_position_ids(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, model_inputs: dict
    ) -> torch.LongTensor:
        """`(axes, rows, width)`: the position ids the target's own forward uses for `input_ids` when it
        is given none (1-D: the index among each row's real tokens, as generate() builds them).
        `model_inputs`: the target's other inputs (images, grids, token types)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return ((attention_mask.long().cumsum(-1) - 1).clamp(min=0))[None].expand(self.rotary_axes, -1, -1)

    def target_positions(self, input_ids: torch.LongTensor, prompt_mask: torch.Tensor, model_kwargs: dict) -> TargetPositions:
        """The target's positions for the left-padded prompts `input_ids`: generate()'s own `position_ids`
        when `model_kwargs` hold them (M-RoPE targets keep a leading text-only axis there, dropped),
        else what the target's forward would compute ([`rotary_position_ids`])."""
        given = model_kwargs.get("position_ids")
        if given is None:
            prompt = self.rotary_position_ids(input_ids, prompt_mask, model_kwargs)
        else:
            prompt = given[..., : input_ids.shape[1]]
            prompt = (prompt[None] if prompt.ndim == 2 else prompt)[-self.rotary_axes :]
            if prompt.shape[0] != self.rotary_axes:
                raise ValueError(
                    f"position_ids of shape {tuple(given.shape)} do not fit {self.family}'s {self.rotary_axes}-axis rotary positions."
                )
        return TargetPositions.from_prompt(prompt.to(input_ids.device), prompt_mask)

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

    def blank_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """As every family, except that an all-zero picture of the `(batch, images, c, h, w)` tensor stays all zero:
        Idefics3 reads it as a padding image (a ragged batch holds them), and a blank one must not become real."""
        padding = (pixel_values == 0).flatten(-3).all(-1)[..., None, None, None]
        return super().blank_pixel_values(pixel_values).masked_fill(padding, 0)


@register_target_adapter
class Gemma3Adapter(TargetAdapter):
    """Gemma3: SigLIP + projector; embeddings scaled by sqrt(hidden) inside the embedding module;
    the image token id may lie outside the text vocabulary; generate() passes `token_type_ids`."""

    family = "gemma3"
    model_types = ("gemma3",)
    token_type_keys = ("token_type_ids",)


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
    token_type_keys = ("mm_token_type_ids",)  # image marks

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


class _QwenVLAdapter(_VideoPlaceholderMixin, TargetAdapter):
    """Qwen-VL families: M-RoPE (3-D rotary positions: temporal, height, width per visual token; text
    after an image continues from the image's largest index), image and video placeholders (both
    are visual tokens for compression), positions from the model's own `get_rope_index`."""

    rotary_axes = 3
    default_mrope_section: ClassVar[list[int]] = []
    token_type_keys = ("mm_token_type_ids",)  # text 0 / image 1 / video 2

    @property
    def mrope_section(self) -> list[int]:
        rope = getattr(self.text_config, "rope_parameters", None) or {}
        # the target's rotary falls back to its class default when the config names none
        return list(rope.get("mrope_section") or self.default_mrope_section)

    def rotary_position_ids(self, input_ids, attention_mask, model_inputs) -> torch.LongTensor:
        grids = {key: model_inputs.get(key) for key in ("image_grid_thw", "video_grid_thw")}
        token_types = model_inputs.get("mm_token_type_ids")
        if token_types is None or all(grid is None for grid in grids.values()):  # text only: 1-D positions on every axis
            return super().rotary_position_ids(input_ids, attention_mask, model_inputs)
        extra = (
            {"second_per_grid_ts": model_inputs["second_per_grid_ts"]}
            if model_inputs.get("second_per_grid_ts") is not None
            else {}
        )
        positions, _ = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=token_types, attention_mask=attention_mask, **grids, **extra
        )
        return positions


@register_target_adapter
class Qwen2_5_VLAdapter(_QwenVLAdapter):
    """Qwen2.5-VL: windowed ViT + 2x2 patch merger, Qwen2 text model with M-RoPE whose frequencies
    are split into consecutive temporal / height / width chunks (`mrope_section`, [16, 24, 24])."""

    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    default_mrope_section = [16, 24, 24]


@register_target_adapter
class Qwen3VLAdapter(_QwenVLAdapter):
    """Qwen3-VL: ViT with deepstack, Qwen3 text model (q/k norm) with interleaved M-RoPE
    (t, h, w, t, h, w, ... frequencies; `mrope_section` [24, 20, 20]).

    Deepstack adds features of early vision layers to the hidden states of the visual positions
    after each of the first `len(vision_config.deepstack_visual_indexes)` decoder layers (3 in the
    real models). What the drafter reads is unchanged: the merged input embeddings (the merger's
    output, without deepstack features, which the drafter cannot receive for tokens it drafts
    anyway) and the last-layer features, which come after every injection and carry it. The entropy
    candidates start after the injections: layer `l`'s input hidden state is supervision for the
    first draft block, and only from layer `D + 1` on (`D` injections) has a text token attended to
    visual keys that hold every deepstack feature; the earlier layers' attention reads partly
    injected images, so their entropy says more about the injection schedule than about the token.
    """

    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    mrope_interleaved = True
    default_mrope_section = [24, 20, 20]

    @property
    def num_deepstack_layers(self) -> int:
        """Decoder layers after which deepstack injects vision features."""
        return len(getattr(getattr(self.config, "vision_config", None), "deepstack_visual_indexes", None) or [])

    def entropy_candidate_layers(self) -> list[int]:
        first = self.num_deepstack_layers + 1
        layers = [layer for layer in super().entropy_candidate_layers() if layer >= first]
        # a shallow model whose default range ends inside the injections: the first layer after them
        return layers or [min(first, self.num_hidden_layers - 1)]
