"""Tiny, random, offline vision-language models for tests and CPU demos.

Nothing here touches the Hub: every model is built from configs with random
weights (deterministic for a given ``seed``), in ``eval()`` mode and float32.

Public API
----------
``SUPPORTED_TINY_FAMILIES``
    ``("llava", "llava_next", "pixtral", "idefics3", "gemma3", "mistral3", "llava_onevision", "internvl", "gemma4",
    "qwen2_5_vl", "qwen3_vl")``
``MROPE_TINY_FAMILIES``
    ``("qwen2_5_vl", "qwen3_vl")``: 3-D rotary positions (M-RoPE) and video inputs.
``build_tiny_target(family, seed=0, vocab_size=None, attn_implementation="sdpa")``
    Returns a ``transformers.PreTrainedModel`` (a ``*ForConditionalGeneration``).
    The model carries a :class:`TinyVLMSpec` as ``model.tiny_spec`` describing its
    special token ids and image geometry (used by :func:`make_tiny_inputs`).
``build_tiny_tokenizer(model)``
    A fast tokenizer for the model's ids: id ``i`` is one character (``a-z A-Z 0-9``,
    then Greek and Cyrillic letters), so ``stop_strings`` can be matched on the
    tiny models' output.
``make_tiny_inputs(model, seed=0, num_images=1, text_len_before=5, text_len_after=7, batch_size=1, num_videos=0, image_first=False)``
    Returns kwargs for ``model(**inputs)`` / ``model.generate(**inputs)``. Rows
    are ``[bos] text_before <image block>*num_images <video block>*num_videos text_after``
    (no bos for Qwen; videos for Qwen only); with ``batch_size > 1`` row ``r`` gets ``r``
    extra text tokens before and after the images and the batch is LEFT padded with the
    pad id. ``image_first`` (with ``text_len_before=0``): every row's very first token is
    an image placeholder (no bos, no text and no opening delimiter before it).

Token-id layout (default ``vocab_size=256``, ``V`` = text vocab size)
--------------------------------------------------------------------
Low ids are pad/bos/eos; image-related specials sit at the top of the vocab,
except where the real checkpoint does otherwise (pixtral: low ids as in
Mistral's tekken tokenizer; gemma3: image id *outside* the text vocab).
Random text ids are drawn from ``spec.text_token_range`` (half-open), which
excludes every special id. For the four untied families the ``lm_head`` rows of
all special ids except eos are zeroed, so greedy decoding never emits an image
placeholder or other special (eos can be emitted and stops generation early).

==========  =====  =====  =====  ======================================================
family      pad    bos    eos    image-related ids
==========  =====  =====  =====  ======================================================
llava       0      1      2      image=V-1
llava_next  0      1      2      image=V-1
pixtral     11     1      2      image=10, image_break=12, image_end=13 (as real Pixtral)
idefics3    0      1      2      image=V-1, fake_token_around_image=V-2, global_img=V-3,
                                 end_of_utterance=V-4 (eos stays 2)
gemma3      0      2(*)   1(*)   image=V (OOV!), boi=V-2, eoi=V-1      (*) as real Gemma3
mistral3    11     1      2      as pixtral (image=10, image_break=12, image_end=13)
llava_ov    0      1      2      image=V-1, video=V-2 (llava_onevision)
internvl    0      1      2      image (<IMG_CONTEXT>)=V-1, <img>=V-2, </img>=V-3
gemma4      0      2      1      image=V-1, video=V-2, audio=V-3, boi=V-4, eoi=V-5, boa=V-6, eoa=V-7
                                 (inside the vocab; the model swaps them for pad before embedding)
qwen2_5_vl  0      (1)    2      image=V-1, video=V-2, vision_start=V-3, vision_end=V-4 (no bos in prompts)
qwen3_vl    0      (1)    2      same as qwen2_5_vl; its eos row is zeroed too (never emitted)
==========  =====  =====  =====  ======================================================

The four later families (mistral3, llava_onevision, internvl, gemma4) keep their
family's paths: ``m.model.language_model.layers``, ``m.lm_head``,
``m.config.image_token_id``. mistral3 images are ``rows x ([IMG]*cols +
[IMG_BREAK])`` (last one ``[IMG_END]``) with one token per
``patch * spatial_merge_size`` pixels, given with ``image_sizes``;
llava_onevision tiles like llava_next (``image_sizes``, 5-D ``pixel_values``);
internvl images are ``<img> <IMG_CONTEXT>*16 </img>``; gemma4 images are
``<boi> <image>*4 <eoi>`` from pre-patchified ``pixel_values`` ``[n_images,
patches, 3 * patch**2]`` plus ``image_position_ids`` ``[n_images, patches, 2]``,
and ``mm_token_type_ids`` (1 on image tokens) turns on bidirectional attention
inside image blocks, as gemma3's ``token_type_ids``. gemma4's lm_head is tied:
only the image/video/audio rows are zeroed (the model never embeds those ids).

Attribute paths in transformers 5.24 (``m`` = the returned model)
-----------------------------------------------------------------
All five: ``m.lm_head`` (``nn.Linear``, untied for llava/llava_next/pixtral/idefics3,
tied to the input embeddings for gemma3), ``m.get_input_embeddings()`` and
``m.get_output_embeddings()`` work, ``m.model`` is the ``*Model`` wrapper, and
``m.config.image_token_id`` works everywhere (for llava/llava_next/pixtral/gemma3
it is an ``attribute_map`` alias of the stored field ``image_token_index``; for
idefics3 the field itself is ``image_token_id``). ``m.config.get_text_config()``
returns the text sub-config (``vocab_size``, ``hidden_size``, ``eos_token_id``...).
The new-style cache kwarg is ``cache=`` (``past_key_values=`` is deprecated: it
still works until 5.40 but emits a FutureWarning) and outputs expose ``out.cache``
(a ``DynamicCache``). ``out.hidden_states`` (``output_hidden_states=True``) holds
the TEXT decoder states only: ``num_layers + 1`` entries, and the last entry is
already passed through the final norm (``logits == lm_head(hidden_states[-1])``
for all five; gemma3 has no logit softcapping here) -- hook the last decoder
layer to get its raw output. Image features are in ``out.image_outputs``.
``generate`` feeds ``pixel_values`` / ``image_sizes`` / ``pixel_attention_mask``
only at prefill (``transformers.generation.utils.MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL``)
and gemma3's ``prepare_inputs_for_generation`` drops ``token_type_ids`` after it.
Batched left-padded greedy generation matches per-row unpadded generation
token-for-token for all five families (checked in tests/test_testing.py).

* qwen2_5_vl / qwen3_vl (``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration``)
    - decoder layers:   ``m.model.language_model.layers``; rotary ``m.model.language_model.rotary_emb``
      (M-RoPE: takes ``(3, batch, seq)`` position ids; ``mrope_section`` [2, 3, 3] chunked for
      qwen2_5_vl, [4, 2, 2] interleaved for qwen3_vl)
    - lm_head ``m.lm_head`` (untied); ``m.config.image_token_id`` / ``video_token_id``
    - inputs: ``pixel_values`` are flattened patches ``(patches, 3 * 2 * 4 * 4)`` with
      ``image_grid_thw`` ``(images, 3)`` in patches (grids (1, 4, 8) and (1, 6, 4), cycled: 8 and 6
      tokens after the 2x2 merge); videos ``pixel_values_videos`` / ``video_grid_thw`` (2, 4, 4):
      8 tokens in one block (qwen2_5_vl) or two frames of 4, each after a timestamp text token
      (qwen3_vl, as its processor lays them out); ``mm_token_type_ids`` (0 text, 1 image, 2 video)
      is what ``get_rope_index`` reads. Image block ``<vision_start> <image>*n <vision_end>``.
    - generate() computes ``position_ids`` of shape ``(4, batch, seq)`` (a text axis, then t, h, w)
      and extends them by +1 per axis per new token.
    - qwen3_vl: four text layers, deepstack injects one vision layer's features after text layer 0.

Helpers: :func:`image_token_counts` (placeholders per row in ``input_ids``),
:func:`image_feature_counts` (feature vectors per row from the model's own
``get_image_features``), :func:`tiny_inputs_row` (one row of a batch, unpadded),
:func:`stack_tiny_inputs` (single-prompt inputs, possibly with different numbers of
images, batched and left padded).

CPU note: these models are so small that torch's intra-op thread pool
dominates when cores are busy (~100 ms/forward with 2 threads on a loaded
2-core box vs ~3 ms with ``OMP_NUM_THREADS=1`` / ``torch.set_num_threads(1)``).

* llava (``LlavaForConditionalGeneration``; CLIPVisionConfig + LlamaConfig)
    - decoder layers:   ``m.model.language_model.layers``  (LlamaModel)
    - input embeddings: ``m.model.language_model.embed_tokens``
    - final norm:       ``m.model.language_model.norm``
    - lm_head:          ``m.lm_head``
    - image token id:   ``m.config.image_token_index`` (alias ``image_token_id``)
    - vision tower:     ``m.model.vision_tower`` (CLIPVisionModel); projector
      ``m.model.multi_modal_projector``; features via
      ``m.model.get_image_features(pixel_values).pooler_output`` (list, one
      ``[n_tokens, hidden]`` tensor per image).
    - quirk: ``vision_feature_layer=-2`` + ``vision_feature_select_strategy="default"``
      drops CLS, so tokens/image = (image_size/patch_size)**2 = 16 here (the
      last CLIP layer is computed but unused, as in the real model).
* llava_next (``LlavaNextForConditionalGeneration``; CLIP + Llama)
    - same paths as llava (``m.model.language_model.layers`` / ``.embed_tokens``,
      ``m.lm_head``, ``m.model.vision_tower``, ``m.config.image_token_index``),
      plus ``m.model.image_newline`` (a parameter appended after each feature row).
    - quirk: needs ``image_sizes`` (orig H, W per image) and 5-D ``pixel_values``
      ``[n_images, n_tiles, 3, s, s]``; ``n_tiles`` = 1 base tile + the anyres
      grid chosen from ``config.image_grid_pinpoints``. The number of image tokens
      depends on ``image_sizes`` (unpadding + newline column) and is computed
      here by running ``m.model.get_image_features`` itself. Images of one
      batch may have different tile counts: the tile dim is zero-padded and the
      model slices it back using ``image_sizes``. Defaults: (20, 36) -> 5 tiles,
      14 tokens; (36, 18) -> 3 tiles, 16 tokens (cycled per image).
* pixtral (``LlavaForConditionalGeneration`` with PixtralVisionConfig + MistralConfig)
    - same paths as llava: ``m.model.language_model.layers`` (MistralModel),
      ``.embed_tokens``, ``m.lm_head``, ``m.config.image_token_index`` (=10),
      vision tower ``m.model.vision_tower`` (PixtralVisionModel).
    - quirk: ``vision_feature_layer=-1``, ``vision_feature_select_strategy="full"``
      (no CLS); needs ``image_sizes`` — images are zero-padded to a common size in
      ``pixel_values`` and the tower crops each to ``image_sizes[i] // patch``.
      Each image is ``rows x ([IMG]*cols + [IMG_BREAK])`` with the very last
      token replaced by ``[IMG_END]``; only ``[IMG]`` (=image_token_id) positions
      receive vision features, break/end are ordinary embedded tokens. The
      break/end ids are NOT config fields in transformers (they live on the
      processor); find them in ``m.tiny_spec.image_break_token_id`` /
      ``image_end_token_id``.
* idefics3 (``Idefics3ForConditionalGeneration``; Idefics3VisionConfig + LlamaConfig)
    - decoder layers:   ``m.model.text_model.layers``   (NOT ``language_model``)
    - input embeddings: ``m.model.text_model.embed_tokens``
    - lm_head:          ``m.lm_head``
    - image token id:   ``m.config.image_token_id`` (also ``m.image_token_id`` and
      ``m.model.image_token_id``)
    - vision tower:     ``m.model.vision_model`` (Idefics3VisionTransformer),
      connector (pixel-shuffle + linear) ``m.model.connector``;
      ``m.model.image_seq_len`` = tokens per image.
    - quirk: ``pixel_values`` is 5-D ``[batch, n_images, 3, H, W]``; all-zero
      images are treated as padding and dropped. ``pixel_attention_mask``
      ``[batch, n_images, H, W]`` (bool) is optional; we pass all-True like the
      processor. Tokens/image = (image_size/patch)**2 / scale_factor**2 = 16.
      Image block (no splitting, as SmolVLM's global image):
      ``<fake_token_around_image><global-img><image>*16<fake_token_around_image>``.
      ``Idefics3Config.pad_token_id`` is a deprecated property that warns; use
      ``config.text_config.pad_token_id``.
* gemma3 (``Gemma3ForConditionalGeneration``; SiglipVisionConfig + Gemma3TextConfig)
    - decoder layers:   ``m.model.language_model.layers`` (Gemma3TextModel)
    - input embeddings: ``m.model.language_model.embed_tokens``
      (``Gemma3TextScaledWordEmbedding``: multiplies by ``sqrt(hidden_size)``)
    - lm_head:          ``m.lm_head`` (tied to embed_tokens)
    - image token id:   ``m.config.image_token_index`` (alias ``image_token_id``);
      ``m.config.boi_token_index`` / ``eoi_token_index`` (aliases ``*_token_id``);
      ``m.config.mm_tokens_per_image``.
    - vision tower:     ``m.model.vision_tower`` (SiglipVisionModel, no head),
      projector ``m.model.multi_modal_projector`` (avg-pool + RMSNorm + matmul).
    - quirks: pass ``token_type_ids`` (1 on image tokens): it turns on
      bidirectional attention inside each image block. Without it the forward
      still runs but silently uses a plain causal mask (different logits);
      ``generate`` drops it after prefill. The image id here is ``V`` = text vocab size, i.e. out of
      vocabulary: ``Gemma3Model.forward`` explicitly supports this (image ids
      ``>= vocab_size`` are swapped to 0 before the embedding lookup), so you can
      NOT call ``embed_tokens(input_ids)`` directly on raw inputs. (The real
      gemma-3 checkpoints use 262144 inside a 262208 vocab; the OOV path is the
      PaliGemma-style one the model code keeps.) Layers alternate
      ``sliding_attention`` / ``full_attention``; the sliding window (512) is
      larger than any test sequence. Final-logit softcapping is off.
      ``Gemma3PreTrainedModel._init_weights`` zero-initialises
      ``multi_modal_projector.mm_input_projection_weight`` (=> a random model
      would ignore images); we re-draw it from N(0, 0.05) with the model seed.
      lm_head is tied, so unlike the other families its special rows are left
      alone: greedy may emit pad/bos/boi/eoi (never the OOV image id).
      Image block as the processor builds it minus the "\n\n" around it:
      ``<boi> <image>*mm_tokens_per_image <eoi>`` (4 image tokens here).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import transformers
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3VisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
    Qwen2Config,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLTextConfig,
    Qwen3VLVisionConfig,
    SiglipVisionConfig,
)

__all__ = [
    "SUPPORTED_TINY_FAMILIES",
    "MROPE_TINY_FAMILIES",
    "TinyVLMSpec",
    "build_tiny_target",
    "make_tiny_inputs",
    "image_token_counts",
    "image_feature_counts",
    "tiny_inputs_row",
    "stack_tiny_inputs",
    "build_tiny_tokenizer",
]

SUPPORTED_TINY_FAMILIES = (
    "llava", "llava_next", "pixtral", "idefics3", "gemma3", "mistral3", "llava_onevision", "internvl", "gemma4",
    "qwen2_5_vl", "qwen3_vl",
)
# Families with 3-D rotary positions (M-RoPE) and video inputs.
MROPE_TINY_FAMILIES = ("qwen2_5_vl", "qwen3_vl")

DEFAULT_VOCAB_SIZE = 256
_MIN_VOCAB_SIZE = 32

# Shared tiny text-model geometry.
_TEXT_HIDDEN = 64
_TEXT_INTERMEDIATE = 128
_TEXT_LAYERS = 2
_TEXT_HEADS = 4
_TEXT_KV_HEADS = 2
_TEXT_HEAD_DIM = _TEXT_HIDDEN // _TEXT_HEADS
_MAX_POSITIONS = 1024

# Std of the re-initialised gemma3 projector (see build_tiny_target).
_GEMMA3_PROJ_STD = 0.05

# Shared tiny vision-tower geometry.
_VISION_HIDDEN = 32
_VISION_INTERMEDIATE = 64
_VISION_LAYERS = 2
_VISION_HEADS = 4


@dataclasses.dataclass(frozen=True)
class TinyVLMSpec:
    """What :func:`make_tiny_inputs` needs to know about a tiny model.

    Attached to every model built here as ``model.tiny_spec``.
    """

    family: str
    vocab_size: int  # text vocab size (rows of embed_tokens / lm_head)
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int
    image_token_id: int
    text_token_range: tuple[int, int]  # [lo, hi): safe ids for random text
    special_token_ids: tuple[int, ...]  # every id that is not ordinary text
    image_size: int  # side (px) of the square images / tiles fed to the tower
    patch_size: int
    # family-specific extras (None when not applicable)
    image_break_token_id: int | None = None  # pixtral
    image_end_token_id: int | None = None  # pixtral
    fake_image_token_id: int | None = None  # idefics3 <fake_token_around_image>
    global_image_token_id: int | None = None  # idefics3 <global-img>
    end_of_utterance_token_id: int | None = None  # idefics3 <end_of_utterance> (unused in inputs)
    boi_token_id: int | None = None  # gemma3, gemma4
    eoi_token_id: int | None = None  # gemma3, gemma4
    start_image_token_id: int | None = None  # internvl <img>
    end_image_token_id: int | None = None  # internvl </img>
    video_token_id: int | None = None  # llava_onevision, gemma4 (never in the inputs built here)
    spatial_merge_size: int = 1  # mistral3: patches merged per side into one token
    tokens_per_image: int | None = None  # fixed count where the family has one
    pixtral_image_sizes: tuple[tuple[int, int], ...] = ()  # cycled per image (pixtral, mistral3)
    llava_next_image_sizes: tuple[tuple[int, int], ...] = ()  # cycled per image (llava_next, llava_onevision)
    vision_start_token_id: int | None = None  # qwen <|vision_start|>
    vision_end_token_id: int | None = None  # qwen <|vision_end|>
    qwen_image_grids: tuple[tuple[int, int, int], ...] = ()  # (t, h, w) patch grid per image, cycled
    qwen_video_grid: tuple[int, int, int] | None = None  # (t, h, w) patch grid of every video
    merge_size: int | None = None  # qwen spatial merge: tokens = t * h * w / merge_size**2
    temporal_patch_size: int | None = None  # qwen: frames per temporal patch


# --------------------------------------------------------------------------- #
# configs
# --------------------------------------------------------------------------- #


def _text_kwargs(vocab_size: int, pad: int, bos: int, eos: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=_TEXT_INTERMEDIATE,
        num_hidden_layers=_TEXT_LAYERS,
        num_attention_heads=_TEXT_HEADS,
        num_key_value_heads=_TEXT_KV_HEADS,
        head_dim=_TEXT_HEAD_DIM,
        max_position_embeddings=_MAX_POSITIONS,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=False,
    )


def _vision_kwargs(image_size: int, patch_size: int) -> dict[str, Any]:
    return dict(
        hidden_size=_VISION_HIDDEN,
        intermediate_size=_VISION_INTERMEDIATE,
        num_hidden_layers=_VISION_LAYERS,
        num_attention_heads=_VISION_HEADS,
        image_size=image_size,
        patch_size=patch_size,
    )


def _build_llava(V: int) -> tuple[type, Any, TinyVLMSpec]:
    # LLaVA-1.5: CLIP tower, features = hidden_states[-2] minus CLS, 2-layer MLP
    # projector, Llama text. Image token at the top of the vocab (real: 32000 in
    # a 32064 vocab). 16x16 image, patch 4 -> 16 image tokens.
    image_size, patch = 16, 4
    pad, bos, eos, img = 0, 1, 2, V - 1
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_vision_kwargs(image_size, patch), projection_dim=32),
        text_config=LlamaConfig(**_text_kwargs(V, pad, bos, eos)),
        image_token_index=img,
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    spec = TinyVLMSpec(
        family="llava", vocab_size=V, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
        image_token_id=img, text_token_range=(3, V - 1), special_token_ids=(pad, bos, eos, img),
        image_size=image_size, patch_size=patch, tokens_per_image=(image_size // patch) ** 2,
    )
    return LlavaForConditionalGeneration, config, spec


def _build_llava_next(V: int) -> tuple[type, Any, TinyVLMSpec]:
    # LLaVA-NeXT ("anyres"): each image is a base tile + a grid of tiles picked
    # from image_grid_pinpoints; features are unpadded to the original aspect
    # ratio and an `image_newline` vector is appended per row. 16px tiles with
    # patch 8 -> 2x2 features per tile. Token count depends on image_sizes.
    tile, patch = 16, 8
    pad, bos, eos, img = 0, 1, 2, V - 1
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_vision_kwargs(tile, patch), projection_dim=32),
        text_config=LlamaConfig(**_text_kwargs(V, pad, bos, eos)),
        image_token_index=img,
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
        image_seq_length=(tile // patch) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    spec = TinyVLMSpec(
        family="llava_next", vocab_size=V, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
        image_token_id=img, text_token_range=(3, V - 1), special_token_ids=(pad, bos, eos, img),
        image_size=tile, patch_size=patch,
        # (orig H, orig W) per image, cycled: (20, 36) -> 2x2 grid = 5 tiles,
        # rows unpadded, 14 tokens; (36, 18) -> 2x1 grid = 3 tiles, 16 tokens.
        llava_next_image_sizes=((20, 36), (36, 18)),
    )
    return LlavaNextForConditionalGeneration, config, spec


def _build_pixtral(V: int) -> tuple[type, Any, TinyVLMSpec]:
    # Pixtral = LlavaForConditionalGeneration + PixtralVisionModel + Mistral
    # text (as mistral-community/pixtral-12b). No CLS: feature layer -1,
    # strategy "full". Native resolution: every image has its own size given by
    # image_sizes; tokens = (H/patch)*(W/patch). Ids mirror the real tekken
    # tokenizer: [IMG]=10, [IMG_BREAK]=12, [IMG_END]=13, <pad>=11.
    max_size, patch = 32, 8
    pad, bos, eos, img, brk, end = 11, 1, 2, 10, 12, 13
    text = MistralConfig(**_text_kwargs(V, pad, bos, eos), sliding_window=None)
    config = LlavaConfig(
        vision_config=PixtralVisionConfig(**_vision_kwargs(max_size, patch)),
        text_config=text,
        image_token_index=img,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
    )
    spec = TinyVLMSpec(
        family="pixtral", vocab_size=V, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
        image_token_id=img, text_token_range=(16, V),
        special_token_ids=tuple(range(0, 16)),
        image_size=max_size, patch_size=patch,
        image_break_token_id=brk, image_end_token_id=end,
        # (H, W) per image, cycled: 3x4 = 12 tokens and 4x2 = 8 tokens.
        pixtral_image_sizes=((24, 32), (32, 16)),
    )
    return LlavaForConditionalGeneration, config, spec


def _build_idefics3(V: int) -> tuple[type, Any, TinyVLMSpec]:
    # SmolVLM / Idefics3: SigLIP-like tower, pixel-shuffle connector
    # (scale_factor**2 patches merged per token), Llama text. Vision model and
    # text model live at model.model.vision_model / model.model.text_model.
    image_size, patch, scale = 32, 4, 2
    pad, bos, eos = 0, 1, 2
    img, fake, glob, eou = V - 1, V - 2, V - 3, V - 4
    tokens = (image_size // patch) ** 2 // scale**2
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**_vision_kwargs(image_size, patch)),
        text_config=LlamaConfig(**_text_kwargs(V, pad, bos, eos)),
        image_token_id=img,
        scale_factor=scale,
        pad_token_id=pad,
    )
    spec = TinyVLMSpec(
        family="idefics3", vocab_size=V, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
        image_token_id=img, text_token_range=(3, V - 4),
        special_token_ids=(pad, bos, eos, eou, glob, fake, img),
        image_size=image_size, patch_size=patch,
        fake_image_token_id=fake, global_image_token_id=glob, end_of_utterance_token_id=eou,
        tokens_per_image=tokens,
    )
    return Idefics3ForConditionalGeneration, config, spec


def _build_gemma3(V: int) -> tuple[type, Any, TinyVLMSpec]:
    # Gemma 3: SigLIP tower (no pooling head), avg-pool to mm_tokens_per_image,
    # Gemma3 text (scaled embeddings, q/k norm, sliding+global layers, tied
    # lm_head). token_type_ids mark image tokens for bidirectional attention.
    # Image id is out of vocab (= V); boi/eoi are the top two text ids.
    image_size, patch, mm_tokens = 32, 8, 4
    pad, eos, bos = 0, 1, 2
    boi, eoi, img = V - 2, V - 1, V
    text = Gemma3TextConfig(
        **{**_text_kwargs(V, pad, bos, eos), "tie_word_embeddings": True},
        query_pre_attn_scalar=_TEXT_HEAD_DIM,
        sliding_window=512,
        layer_types=["sliding_attention", "full_attention"],
    )
    vision = SiglipVisionConfig(**_vision_kwargs(image_size, patch), vision_use_head=False)
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=mm_tokens,
        boi_token_index=boi,
        eoi_token_index=eoi,
        image_token_index=img,
        tie_word_embeddings=True,
    )
    spec = TinyVLMSpec(
        family="gemma3", vocab_size=V, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
        image_token_id=img, text_token_range=(3, V - 2), special_token_ids=(pad, eos, bos, boi, eoi, img),
        image_size=image_size, patch_size=patch,
        boi_token_id=boi, eoi_token_id=eoi, tokens_per_image=mm_tokens,
    )
    return Gemma3ForConditionalGeneration, config, spec


def _build_mistral3(V: int) -> tuple[type, Any, TinyVLMSpec]:
    # Mistral 3 (Mistral-Small-3.1): Pixtral vision tower, then a patch merger
    # (spatial_merge_size**2 patches -> one token) and the projector; Mistral
    # text. Tekken ids as Pixtral. Patch 4, merge 2: one token per 8x8 pixels;
    # each image is rows x ([IMG]*cols + [IMG_BREAK]), last one [IMG_END].
    max_size, patch, merge = 32, 4, 2
    pad, bos, eos, img, brk, end = 11, 1, 2, 10, 12, 13
    config = Mistral3Config(
        vision_config=PixtralVisionConfig(**_vision_kwargs(max_size, patch), head_dim=_VISION_HIDDEN // _VISION_HEADS),
        text_config=MistralConfig(**_text_kwargs(V, pad, bos, eos), sliding_window=None),
        image_token_index=img,
        spatial_merge_size=merge,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    spec = TinyVLMSpec(
        family="mistral3", vocab_size=V, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
        image_token_id=img, text_token_range=(16, V), special_token_ids=tuple(range(0, 16)),
        image_size=max_size, patch_size=patch, spatial_merge_size=merge,
        image_break_token_id=brk, image_end_token_id=end,
        # (H, W) per image, cycled: 3x4 = 12 and 4x2 = 8 merged tokens.
        pixtral_image_sizes=((24, 32), (32, 16)),
    )
    return Mistral3ForConditionalGeneration, config, spec


def _build_llava_onevision(V: int) -> tuple[type, Any, TinyVLMSpec]:
    # LLaVA-OneVision: SigLIP tower (no CLS, strategy "full"), anyres tiling as
    # LLaVA-NeXT with "anyres_max_9" (features bilinearly shrunk past 9 tiles'
    # worth), an image_newline per row, Qwen2 text (q/k/v biases). Image and
    # video ids at the top of the vocab (real: 151646 / 151647).
    tile, patch = 16, 8
    pad, bos, eos, img, vid = 0, 1, 2, V - 1, V - 2
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**_vision_kwargs(tile, patch), vision_use_head=False),
        text_config=Qwen2Config(**_text_kwargs(V, pad, bos, eos), use_sliding_window=False),
        image_token_index=img,
        video_token_index=vid,
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=False,
    )
    spec = TinyVLMSpec(
        family="llava_onevision", vocab_size=V, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
        image_token_id=img, text_token_range=(3, V - 2), special_token_ids=(pad, bos, eos, vid, img),
        image_size=tile, patch_size=patch, video_token_id=vid,
        llava_next_image_sizes=((20, 36), (36, 18)),
    )
    return LlavaOnevisionForConditionalGeneration, config, spec


def _build_internvl(V: int) -> tuple[type, Any, TinyVLMSpec]:
    # InternVL 3 (-hf layout): InternViT (CLS dropped), pixel shuffle by
    # downsample_ratio 0.5 (4 patches -> one token), MLP projector, Qwen2 text.
    # Image block as the processor builds it: <img> <IMG_CONTEXT>*n </img>.
    image_size, patch = 32, 4
    pad, bos, eos = 0, 1, 2
    img, start, stop = V - 1, V - 2, V - 3
    tokens = (image_size // patch) ** 2 // 4
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(**_vision_kwargs(image_size, patch)),
        text_config=Qwen2Config(**_text_kwargs(V, pad, bos, eos), use_sliding_window=False),
        image_token_id=img,
        image_seq_length=tokens,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    spec = TinyVLMSpec(
        family="internvl", vocab_size=V, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
        image_token_id=img, text_token_range=(3, V - 3), special_token_ids=(pad, bos, eos, stop, start, img),
        image_size=image_size, patch_size=patch, start_image_token_id=start, end_image_token_id=stop,
        tokens_per_image=tokens,
    )
    return InternVLForConditionalGeneration, config, spec


def _build_gemma4(V: int) -> tuple[type, Any, TinyVLMSpec]:
    # Gemma 4: its own ViT on pre-patchified pixels with (x, y) patch positions,
    # average-pooled to soft tokens; Gemma4 text with every quirk the engine must
    # handle: per-layer embeddings (PLE), a sliding and a full layer (the full one
    # with its own head_dim, keys reused as values, proportional partial RoPE),
    # final-logit softcapping, bidirectional attention inside image blocks
    # (mm_token_type_ids), a tied lm_head. Image/video/audio ids inside the text
    # vocab as in the real checkpoints; the model swaps them for pad before the
    # embedding lookup. No KV-shared layers (see hf_dream.targets.Gemma4Adapter).
    image_size, patch, pool = 16, 4, 2
    pad, eos, bos = 0, 1, 2
    img, vid, aud, boi, eoi, boa, eoa = V - 1, V - 2, V - 3, V - 4, V - 5, V - 6, V - 7
    text = Gemma4TextConfig(
        **{**_text_kwargs(V, pad, bos, eos), "tie_word_embeddings": True},
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=512,
        global_head_dim=2 * _TEXT_HEAD_DIM,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=V,
        final_logit_softcapping=30.0,
        use_bidirectional_attention="vision",
        num_kv_shared_layers=0,
    )
    vision = Gemma4VisionConfig(
        **{k: v for k, v in _vision_kwargs(image_size, patch).items() if k != "image_size"},
        num_key_value_heads=_VISION_HEADS,
        head_dim=_VISION_HIDDEN // _VISION_HEADS,
        pooling_kernel_size=pool,
        position_embedding_size=64,
    )
    config = Gemma4Config(
        text_config=text, vision_config=vision, audio_config=None,
        image_token_id=img, video_token_id=vid, audio_token_id=aud,
        boi_token_id=boi, eoi_token_id=eoi, boa_token_id=boa, eoa_token_index=eoa,
        tie_word_embeddings=True,
    )
    spec = TinyVLMSpec(
        family="gemma4", vocab_size=V, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
        image_token_id=img, text_token_range=(3, V - 7),
        special_token_ids=(pad, eos, bos, eoa, boa, eoi, boi, aud, vid, img),
        image_size=image_size, patch_size=patch, boi_token_id=boi, eoi_token_id=eoi, video_token_id=vid,
        tokens_per_image=(image_size // patch) ** 2 // pool**2,
    )
    return Gemma4ForConditionalGeneration, config, spec


def _qwen_ids(V: int) -> dict[str, int]:
    # Qwen: no bos in real prompts; image/video placeholders and the vision delimiters at the
    # top of the vocab (real: 151655 / 151656 / 151652 / 151653 in a 151936 vocab).
    return dict(pad=0, bos=1, eos=2, img=V - 1, vid=V - 2, start=V - 3, end=V - 4)


def _qwen_spec(family: str, V: int, ids: dict[str, int], patch: int, merge: int, temporal: int) -> TinyVLMSpec:
    return TinyVLMSpec(
        family=family, vocab_size=V, pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"],
        image_token_id=ids["img"], text_token_range=(3, V - 4),
        special_token_ids=(ids["pad"], ids["bos"], ids["eos"], ids["end"], ids["start"], ids["vid"], ids["img"]),
        image_size=0, patch_size=patch, video_token_id=ids["vid"], vision_start_token_id=ids["start"],
        vision_end_token_id=ids["end"],
        # grids in patches; h != w so that height and width positions differ: 8 and 6 tokens
        qwen_image_grids=((1, 4, 8), (1, 6, 4)), qwen_video_grid=(2, 4, 4), merge_size=merge, temporal_patch_size=temporal,
    )


def _build_qwen2_5_vl(V: int) -> tuple[type, Any, TinyVLMSpec]:
    # Qwen2.5-VL: windowed ViT over (temporal x 14 x 14) patches, 2x2 patch merger, Qwen2 text
    # with M-RoPE (mrope_section splits the rotary frequencies into temporal / height / width
    # chunks: [16, 24, 24] of 64 in the real model, [2, 3, 3] of 8 here). Patch 4, merge 2.
    ids, patch, merge, temporal = _qwen_ids(V), 4, 2, 2
    text = Qwen2_5_VLTextConfig(
        **{k: v for k, v in _text_kwargs(V, ids["pad"], ids["bos"], ids["eos"]).items() if k not in ("head_dim", "tie_word_embeddings")},
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
    )
    vision = Qwen2_5_VLVisionConfig(
        depth=_VISION_LAYERS, hidden_size=_VISION_HIDDEN, intermediate_size=_VISION_INTERMEDIATE, num_heads=_VISION_HEADS,
        out_hidden_size=_TEXT_HIDDEN, patch_size=patch, spatial_merge_size=merge, temporal_patch_size=temporal,
        window_size=patch * merge * 2, fullatt_block_indexes=[_VISION_LAYERS - 1], tokens_per_second=2,
    )
    config = Qwen2_5_VLConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=ids["img"], video_token_id=ids["vid"],
        vision_start_token_id=ids["start"], vision_end_token_id=ids["end"], tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration, config, _qwen_spec("qwen2_5_vl", V, ids, patch, merge, temporal)


def _build_qwen3_vl(V: int) -> tuple[type, Any, TinyVLMSpec]:
    # Qwen3-VL: ViT with learned + rotary positions, "deepstack" (features of early vision
    # layers added to the hidden states of visual positions after the first text layers), Qwen3
    # text (q/k norm) with interleaved M-RoPE ([24, 20, 20] in the real model, [4, 2, 2] here).
    # Four text layers so that layers after the deepstack injection exist (see Qwen3VLAdapter).
    ids, patch, merge, temporal = _qwen_ids(V), 4, 2, 2
    text = Qwen3VLTextConfig(
        **{k: v for k, v in _text_kwargs(V, ids["pad"], ids["bos"], ids["eos"]).items() if k != "tie_word_embeddings"},
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True},
    )
    text.num_hidden_layers = 4
    text.initializer_range = 0.15  # at 0.02 the deepstack-injected image features dominate: greedy repeats one token
    vision = Qwen3VLVisionConfig(
        depth=_VISION_LAYERS, hidden_size=_VISION_HIDDEN, intermediate_size=_VISION_INTERMEDIATE, num_heads=_VISION_HEADS,
        out_hidden_size=_TEXT_HIDDEN, patch_size=patch, spatial_merge_size=merge, temporal_patch_size=temporal,
        num_position_embeddings=64, deepstack_visual_indexes=[0],
    )
    config = Qwen3VLConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=ids["img"], video_token_id=ids["vid"],
        vision_start_token_id=ids["start"], vision_end_token_id=ids["end"], tie_word_embeddings=False,
    )
    return Qwen3VLForConditionalGeneration, config, _qwen_spec("qwen3_vl", V, ids, patch, merge, temporal)


_BUILDERS = {
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "pixtral": _build_pixtral,
    "idefics3": _build_idefics3,
    "gemma3": _build_gemma3,
    "mistral3": _build_mistral3,
    "llava_onevision": _build_llava_onevision,
    "internvl": _build_internvl,
    "gemma4": _build_gemma4,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "qwen3_vl": _build_qwen3_vl,
}
assert tuple(_BUILDERS) == SUPPORTED_TINY_FAMILIES


def build_tiny_target(
    family: str,
    seed: int = 0,
    vocab_size: int | None = None,
    attn_implementation: str = "sdpa",
) -> transformers.PreTrainedModel:
    """Build a tiny random VLM of ``family`` (eval mode, float32, weights from ``seed``)."""
    if family not in _BUILDERS:
        raise ValueError(
            f"Unknown tiny family {family!r}; supported families: {', '.join(SUPPORTED_TINY_FAMILIES)}"
        )
    V = DEFAULT_VOCAB_SIZE if vocab_size is None else int(vocab_size)
    if V < _MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {_MIN_VOCAB_SIZE}, got {V}")
    model_cls, config, spec = _BUILDERS[family](V)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
        if family == "gemma3":
            # Gemma3PreTrainedModel._init_weights zero-initialises the projector
            # weight, which would make a random model ignore the image entirely.
            proj = model.model.multi_modal_projector.mm_input_projection_weight
            with torch.no_grad():
                proj.normal_(0.0, _GEMMA3_PROJ_STD)
        elif family == "gemma4":
            # Tied lm_head: zero only the image/video/audio placeholder rows, which
            # the model never reads as inputs (it swaps them for pad before the
            # embedding lookup), so greedy decoding never emits a placeholder.
            rows = [model.config.image_token_id, model.config.video_token_id, model.config.audio_token_id]
            with torch.no_grad():
                model.lm_head.weight[rows] = 0.0
        else:
            # Untied lm_head: zero the rows of every special id except eos. A
            # zero row gives logit 0, which (practically) never beats the max
            # of ~240 random logits, so greedy decoding never emits an image
            # placeholder -- that would break a later forward over
            # prompt+generated tokens with pixel_values (count mismatch).
            # (gemma3 is tied; its image id is out of vocab so can't be emitted.)
            # qwen3_vl: eos too, or the random model stops at once on a two-image prompt (tests pick their own eos ids)
            rows = [t for t in spec.special_token_ids if (t != spec.eos_token_id or family == "qwen3_vl") and t < V]
            with torch.no_grad():
                model.lm_head.weight[rows] = 0.0
    model.eval()

    gc = model.generation_config
    gc.pad_token_id = spec.pad_token_id
    gc.bos_token_id = spec.bos_token_id
    gc.eos_token_id = spec.eos_token_id
    gc.do_sample = False
    model.tiny_spec = spec
    return model


_TOKEN_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def build_tiny_tokenizer(model) -> transformers.PreTrainedTokenizerFast:
    """A tokenizer whose token ``i`` is one character (``a-z A-Z 0-9`` for the first 62 ids,
    then letters from U+03B1 on), covering the model's whole vocab: ``decode`` turns ids into a
    string one character per token, so stop strings (``generate(stop_strings=..., tokenizer=...)``)
    can be matched on a tiny model's output, across token boundaries too."""
    from tokenizers import Tokenizer, decoders, models

    size = _spec_of(model).vocab_size + 1  # gemma3's image id sits just outside the text vocab
    vocab = {(_TOKEN_CHARACTERS[i] if i < len(_TOKEN_CHARACTERS) else chr(0x3B1 + i)): i for i in range(size)}
    backend = Tokenizer(models.BPE(vocab, merges=[]))  # no merges: one character, one token
    backend.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend)


# --------------------------------------------------------------------------- #
# inputs
# --------------------------------------------------------------------------- #


def _spec_of(model) -> TinyVLMSpec:
    spec = getattr(model, "tiny_spec", None)
    if spec is None:
        raise ValueError("make_tiny_inputs expects a model built by hf_dream.testing.build_tiny_target")
    return spec


def _image_blocks_and_pixels(model, spec: TinyVLMSpec, n_images: int, gen: torch.Generator):
    """Return (list of token-id lists, one per image, extra tensors) for ``n_images`` images."""
    s = spec.image_size
    fam = spec.family
    if fam in ("llava", "gemma3"):
        pixels = torch.randn(n_images, 3, s, s, generator=gen)
        if fam == "llava":
            block = [spec.image_token_id] * spec.tokens_per_image
        else:  # gemma3: <boi> <img>*mm_tokens <eoi>  (processor also adds "\n\n" around it)
            block = [spec.boi_token_id] + [spec.image_token_id] * spec.tokens_per_image + [spec.eoi_token_id]
        return [list(block) for _ in range(n_images)], {"pixel_values": pixels}

    if fam in ("pixtral", "mistral3"):
        sizes = [spec.pixtral_image_sizes[i % len(spec.pixtral_image_sizes)] for i in range(n_images)]
        pixels = torch.zeros(n_images, 3, s, s)
        blocks = []
        token_side = spec.patch_size * spec.spatial_merge_size
        for i, (h, w) in enumerate(sizes):
            pixels[i, :, :h, :w] = torch.randn(3, h, w, generator=gen)
            rows, cols = h // token_side, w // token_side
            block = ([spec.image_token_id] * cols + [spec.image_break_token_id]) * rows
            block[-1] = spec.image_end_token_id
            blocks.append(block)
        return blocks, {"pixel_values": pixels, "image_sizes": torch.tensor(sizes, dtype=torch.long)}

    if fam in ("llava_next", "llava_onevision"):
        sizes = [spec.llava_next_image_sizes[i % len(spec.llava_next_image_sizes)] for i in range(n_images)]
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        n_tiles = [
            image_size_to_num_patches(sz, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
            for sz in sizes
        ]
        pixels = torch.zeros(n_images, max(n_tiles), 3, s, s)
        for i, n in enumerate(n_tiles):
            pixels[i, :n] = torch.randn(n, 3, s, s, generator=gen)
        image_sizes = torch.tensor(sizes, dtype=torch.long)
        counts = _llava_next_token_counts(model, pixels, image_sizes)
        blocks = [[spec.image_token_id] * c for c in counts]
        return blocks, {"pixel_values": pixels, "image_sizes": image_sizes}

    if fam == "internvl":
        pixels = torch.randn(n_images, 3, s, s, generator=gen)
        block = [spec.start_image_token_id] + [spec.image_token_id] * spec.tokens_per_image + [spec.end_image_token_id]
        return [list(block) for _ in range(n_images)], {"pixel_values": pixels}

    if fam == "gemma4":
        # pre-patchified as Gemma4's image processor does: (images, patches, 3 * patch**2) in [0, 1],
        # with each patch's (x, y) position in the patch grid
        side = s // spec.patch_size
        pixels = torch.rand(n_images, side * side, 3 * spec.patch_size**2, generator=gen)
        grid = torch.arange(side * side)
        positions = torch.stack([grid % side, grid // side], dim=-1).expand(n_images, -1, -1).clone()
        block = [spec.boi_token_id] + [spec.image_token_id] * spec.tokens_per_image + [spec.eoi_token_id]
        return [list(block) for _ in range(n_images)], {"pixel_values": pixels, "image_position_ids": positions}

    if fam in MROPE_TINY_FAMILIES:
        grids = [spec.qwen_image_grids[i % len(spec.qwen_image_grids)] for i in range(n_images)]
        blocks = [[spec.vision_start_token_id] + [spec.image_token_id] * _qwen_tokens(spec, g) + [spec.vision_end_token_id] for g in grids]
        return blocks, {"pixel_values": _qwen_patches(spec, grids, gen), "image_grid_thw": torch.tensor(grids, dtype=torch.long)}

    if fam == "idefics3":
        pixels = torch.randn(n_images, 3, s, s, generator=gen)
        block = (
            [spec.fake_image_token_id, spec.global_image_token_id]
            + [spec.image_token_id] * spec.tokens_per_image
            + [spec.fake_image_token_id]
        )
        return [list(block) for _ in range(n_images)], {"pixel_values": pixels}

    raise AssertionError(fam)


def _qwen_tokens(spec: TinyVLMSpec, grid) -> int:
    t, h, w = grid
    return t * h * w // spec.merge_size**2


def _qwen_patches(spec: TinyVLMSpec, grids, gen: torch.Generator) -> torch.Tensor:
    """Flattened patches as the Qwen processors emit them: one row of `3 x temporal x patch x patch` per patch."""
    width = 3 * spec.temporal_patch_size * spec.patch_size**2
    return torch.randn(sum(t * h * w for t, h, w in grids), width, generator=gen)


def _qwen_video_blocks(spec: TinyVLMSpec, n_videos: int, gen: torch.Generator) -> tuple[list[list[int]], dict]:
    """Video blocks: Qwen2.5-VL, one `<vision_start> <video>*(t*h*w/4) <vision_end>` per video; Qwen3-VL,
    per temporal patch a timestamp (one text token here) then `<vision_start> <video>*(h*w/4) <vision_end>`
    (its `get_rope_index` gives every such frame group its own grid)."""
    t, h, w = spec.qwen_video_grid
    lo, hi = spec.text_token_range
    blocks = []
    for _ in range(n_videos):
        if spec.family == "qwen3_vl":
            block = []
            for _frame in range(t):
                stamp = int(torch.randint(lo, hi, (1,), generator=gen))
                block += [stamp, spec.vision_start_token_id] + [spec.video_token_id] * _qwen_tokens(spec, (1, h, w)) + [spec.vision_end_token_id]
        else:
            block = [spec.vision_start_token_id] + [spec.video_token_id] * _qwen_tokens(spec, (t, h, w)) + [spec.vision_end_token_id]
        blocks.append(block)
    grids = [(t, h, w)] * n_videos
    return blocks, {"pixel_values_videos": _qwen_patches(spec, grids, gen), "video_grid_thw": torch.tensor(grids, dtype=torch.long)}


def _llava_next_token_counts(model, pixel_values, image_sizes) -> list[int]:
    # Ask the model itself: the count depends on the anyres grid, unpadding
    # and the newline column, so reimplementing it would be fragile.
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values, image_sizes).pooler_output
    return [int(f.shape[0]) for f in feats]


def image_token_counts(model, inputs: dict) -> list[int]:
    """Per-row number of image-feature placeholder tokens (``== image_token_id``)."""
    spec = _spec_of(model)
    return [int(c) for c in (inputs["input_ids"] == spec.image_token_id).sum(-1)]


def make_tiny_inputs(
    model,
    seed: int = 0,
    num_images: int = 1,
    text_len_before: int = 5,
    text_len_after: int = 7,
    batch_size: int = 1,
    num_videos: int = 0,
    image_first: bool = False,
) -> dict:
    """Random, deterministic inputs for a model from :func:`build_tiny_target`.

    Every row is ``[bos] text_before (image block)*num_images (video block)*num_videos text_after``
    (Qwen prompts have no bos, as the real ones); row ``r`` has ``r`` extra text tokens both before
    and after the images, and rows are LEFT padded with the pad id (attention_mask 0 on padding).
    ``num_videos`` needs a Qwen family (``MROPE_TINY_FAMILIES``). With ``image_first`` every row's
    very first token is an image placeholder: no bos, no text before (``text_len_before`` must be 0)
    and no opening token of the first image block (Qwen's ``<vision_start>``, InternVL's ``<img>``,
    Gemma's ``<boi>``).
    """
    spec = _spec_of(model)
    if num_images < 0 or num_videos < 0 or batch_size < 1 or text_len_before < 0 or text_len_after < 0:
        raise ValueError("num_images/num_videos/text lengths must be >= 0 and batch_size >= 1")
    qwen = spec.family in MROPE_TINY_FAMILIES
    if num_videos and not qwen:
        raise ValueError(f"num_videos needs a family with video inputs ({', '.join(MROPE_TINY_FAMILIES)}), got {spec.family!r}")
    if image_first and (num_images < 1 or text_len_before):
        raise ValueError("image_first needs num_images >= 1 and text_len_before=0")
    gen = torch.Generator().manual_seed(seed)
    lo, hi = spec.text_token_range

    rows: list[list[int]] = []
    per_row_pixels: list[dict[str, torch.Tensor]] = []
    for r in range(batch_size):
        before = [] if image_first else torch.randint(lo, hi, (text_len_before + r,), generator=gen).tolist()
        after = torch.randint(lo, hi, (text_len_after + r,), generator=gen).tolist()
        ids = ([] if qwen or image_first else [spec.bos_token_id]) + before
        extra: dict[str, torch.Tensor] = {}
        if num_images:
            blocks, extra = _image_blocks_and_pixels(model, spec, num_images, gen)
            if image_first:
                blocks[0] = blocks[0][blocks[0].index(spec.image_token_id) :]
            for b in blocks:
                ids += b
        if num_videos:
            blocks, videos = _qwen_video_blocks(spec, num_videos, gen)
            extra = {**extra, **videos}
            for b in blocks:
                ids += b
        per_row_pixels.append(extra)
        ids += after
        rows.append(ids)

    max_len = max(len(r) for r in rows)
    input_ids = torch.full((batch_size, max_len), spec.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, max_len), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, max_len - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, max_len - len(ids):] = 1
    inputs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}

    if num_images or num_videos:
        fam = spec.family
        if fam == "idefics3":
            # [batch, n_images, 3, H, W] + matching boolean pixel mask.
            pv = torch.stack([p["pixel_values"] for p in per_row_pixels])
            inputs["pixel_values"] = pv
            inputs["pixel_attention_mask"] = torch.ones(
                pv.shape[0], pv.shape[1], pv.shape[-2], pv.shape[-1], dtype=torch.bool
            )
        elif fam in ("llava_next", "llava_onevision"):
            # Rows may have different tile counts: pad the tile dim (the model
            # slices each image back to its own count using image_sizes).
            n_tiles = max(p["pixel_values"].shape[1] for p in per_row_pixels)
            pvs = []
            for p in per_row_pixels:
                pv = p["pixel_values"]
                if pv.shape[1] < n_tiles:
                    pv = torch.cat([pv, pv.new_zeros(pv.shape[0], n_tiles - pv.shape[1], *pv.shape[2:])], 1)
                pvs.append(pv)
            inputs["pixel_values"] = torch.cat(pvs)
            inputs["image_sizes"] = torch.cat([p["image_sizes"] for p in per_row_pixels])
        else:  # one entry per image (qwen: per patch, with a grid per image or video), rows in order
            for key in per_row_pixels[0]:  # pixel_values, and image_sizes / image_position_ids / grids where the family has them
                inputs[key] = torch.cat([p[key] for p in per_row_pixels])
    inputs.update(_token_types(spec, input_ids))
    return inputs


def _qwen_row_visuals(inputs: dict, bsz: int, row: int) -> dict:
    """The images and videos of batch row ``row`` (every row holds as many as the others)."""
    out = {}
    for pixels, grids in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if grids not in inputs:
            continue
        per_row = inputs[grids].shape[0] // bsz
        patches = inputs[grids].prod(-1).tolist()
        start = sum(patches[: row * per_row])
        count = sum(patches[row * per_row : (row + 1) * per_row])
        out[pixels] = inputs[pixels][start : start + count]
        out[grids] = inputs[grids][row * per_row : (row + 1) * per_row]
    return out


def _token_types(spec: TinyVLMSpec, input_ids: torch.LongTensor) -> dict[str, torch.Tensor]:
    """The per-token marks a family's processor returns: gemma3's `token_type_ids` and gemma4's
    `mm_token_type_ids` (1 on image tokens; both turn on bidirectional attention inside image
    blocks), Qwen's `mm_token_type_ids` (1 image, 2 video: its M-RoPE positions read them),
    nothing elsewhere."""
    image = input_ids == spec.image_token_id
    if spec.family in MROPE_TINY_FAMILIES:
        return {"mm_token_type_ids": image.int() + 2 * (input_ids == spec.video_token_id).int()}
    key = {"gemma3": "token_type_ids", "gemma4": "mm_token_type_ids"}.get(spec.family)
    return {} if key is None else {key: image.long()}


def tiny_inputs_row(model, inputs: dict, row: int) -> dict:
    """Slice row ``row`` out of a :func:`make_tiny_inputs` batch, dropping its left padding.

    Handy to check that batched (left-padded) results match unbatched ones.
    """
    spec = _spec_of(model)
    bsz = inputs["input_ids"].shape[0]
    keep = inputs["attention_mask"][row].bool()
    out = {
        "input_ids": inputs["input_ids"][row : row + 1, keep],
        "attention_mask": inputs["attention_mask"][row : row + 1, keep],
    }
    for key in ("token_type_ids", "mm_token_type_ids"):
        if key in inputs:
            out[key] = inputs[key][row : row + 1, keep]
    if spec.family in MROPE_TINY_FAMILIES:
        return {**out, **_qwen_row_visuals(inputs, bsz, row)}
    if "pixel_values" in inputs:
        if spec.family == "idefics3":
            out["pixel_values"] = inputs["pixel_values"][row : row + 1]
            if "pixel_attention_mask" in inputs:
                out["pixel_attention_mask"] = inputs["pixel_attention_mask"][row : row + 1]
        else:
            # one entry per image, images of all rows concatenated in order
            n = inputs["pixel_values"].shape[0] // bsz
            for key in ("pixel_values", "image_sizes", "image_position_ids"):
                if key in inputs:
                    out[key] = inputs[key][row * n : (row + 1) * n]
    return out


def stack_tiny_inputs(model, rows: list[dict]) -> dict:
    """Batch single-prompt inputs (batch size 1 each, e.g. from :func:`make_tiny_inputs` or
    :func:`tiny_inputs_row`), LEFT padded, as a processor would batch them for each family.

    Rows may hold different numbers of images: idefics3 pads its per-row image dim with
    all-zero images (which the model drops), llava_next pads the tile dim; the other families
    list the images of all rows in order.
    """
    spec = _spec_of(model)
    width = max(row["input_ids"].shape[1] for row in rows)
    input_ids = torch.full((len(rows), width), spec.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for index, row in enumerate(rows):
        length = row["input_ids"].shape[1]
        input_ids[index, width - length :] = row["input_ids"][0]
        attention_mask[index, width - length :] = row["attention_mask"][0]
    batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
    batch.update(_token_types(spec, input_ids))
    if spec.family in MROPE_TINY_FAMILIES:  # patches and grids of every row's images and videos, in order
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            if any(key in row for row in rows):
                batch[key] = torch.cat([row[key] for row in rows if key in row])
        return batch
    pixels = [row["pixel_values"] for row in rows if "pixel_values" in row]
    if not pixels:
        return batch
    if len(pixels) != len(rows):
        raise ValueError("stack_tiny_inputs: either every row has images or none does")
    if spec.family == "idefics3":
        most = max(p.shape[1] for p in pixels)
        batch["pixel_values"] = torch.cat(
            [torch.cat([p, p.new_zeros(1, most - p.shape[1], *p.shape[2:])], 1) for p in pixels]
        )
        batch["pixel_attention_mask"] = torch.ones(len(rows), most, *pixels[0].shape[-2:], dtype=torch.bool)
    elif spec.family in ("llava_next", "llava_onevision"):
        tiles = max(p.shape[1] for p in pixels)
        batch["pixel_values"] = torch.cat(
            [torch.cat([p, p.new_zeros(p.shape[0], tiles - p.shape[1], *p.shape[2:])], 1) for p in pixels]
        )
        batch["image_sizes"] = torch.cat([row["image_sizes"] for row in rows])
    else:
        batch["pixel_values"] = torch.cat(pixels)
        for key in ("image_sizes", "image_position_ids"):
            if key in rows[0]:
                batch[key] = torch.cat([row[key] for row in rows])
    return batch


@torch.no_grad()
def image_feature_counts(model, inputs: dict) -> list[int]:
    """Per-row number of image feature vectors the model's OWN vision path produces.

    Uses ``model.model.get_image_features`` of each family; compare with
    :func:`image_token_counts` (a forward raises if they disagree anyway).
    """
    spec = _spec_of(model)
    bsz = inputs["input_ids"].shape[0]
    if "pixel_values" not in inputs:
        return [0] * bsz
    pv = inputs["pixel_values"]
    inner = model.model
    if spec.family in MROPE_TINY_FAMILIES:  # images only (videos are counted by their own placeholders)
        per_image = [int(f.shape[0]) for f in inner.get_image_features(pv, inputs["image_grid_thw"]).pooler_output]
        n = len(per_image) // bsz
        return [sum(per_image[r * n : (r + 1) * n]) for r in range(bsz)]
    if spec.family == "idefics3":
        feats = inner.get_image_features(pv, inputs.get("pixel_attention_mask")).pooler_output
        return [int(f.shape[0]) for f in feats]  # already one entry per row
    if spec.family in ("gemma3", "internvl"):
        feats = inner.get_image_features(pv).pooler_output  # [n_images, tokens, hidden]
        per_image = [int(f.shape[0]) for f in feats]
    elif spec.family == "gemma4":
        per_image = [int(f.shape[0]) for f in inner.get_image_features(pv, inputs["image_position_ids"]).pooler_output]
    elif spec.family in ("llava_next", "llava_onevision"):
        per_image = [int(f.shape[0]) for f in inner.get_image_features(pv, inputs["image_sizes"]).pooler_output]
    else:  # llava, pixtral, mistral3
        kw = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
        per_image = [int(f.shape[0]) for f in inner.get_image_features(pixel_values=pv, **kw).pooler_output]
    n = len(per_image) // bsz
    return [sum(per_image[r * n : (r + 1) * n]) for r in range(bsz)]
