"""The DREAM draft model: initial decoder block -> gated cross-attention over the target's
last-layer features -> final decoder block -> norm -> the target's own frozen lm_head.

The decoder blocks are transformers' `LlamaDecoderLayer` (composed, not copied); the drafter
holds no target weights: the target's input embeddings and lm_head are reached through a
[`TargetAdapter`] attached at run time and never saved with the drafter.
"""

from __future__ import annotations

import importlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, PreTrainedModel
from transformers import initialization as init
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding, rotate_half
from transformers.utils import ModelOutput

from .configuration_dream import CROSS_ATTENTION_FUSIONS, DECODING_OPTION_NAMES, DreamConfig
from .targets import TargetAdapter, get_target_adapter, position_ids_for_model


def _decoder_config(config: DreamConfig, num_layers: int) -> LlamaConfig:
    """A LlamaConfig with the drafter's sizes, for the composed transformers blocks."""
    decoder_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act=config.hidden_act,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=config.attention_bias,
    )
    decoder_config._attn_implementation = "sdpa"
    return decoder_config


class DreamMultimodalRotaryEmbedding(LlamaRotaryEmbedding):
    """Rotary embedding over 3-D positions (M-RoPE: temporal, height, width), as the target's: every
    rotary frequency takes its angle from one position axis, `mrope_section[a]` frequencies per axis
    `a`, in consecutive chunks (Qwen2-VL, Qwen2.5-VL) or interleaved t, h, w, t, h, w, ... with the
    remainder on t (Qwen3-VL). Takes `(3, batch, seq)` position ids, or `(batch, seq)` for positions
    equal on every axis (text)."""

    def __init__(self, config: LlamaConfig, mrope_section: list[int], interleaved: bool):
        super().__init__(config)
        # the position axis of every frequency: a plain list (no buffer, which loading would leave uninitialised)
        if interleaved:
            axis = [0] * sum(mrope_section)
            for index in (1, 2):
                axis[index : 3 * mrope_section[index] : 3] = [index] * mrope_section[index]
        else:
            axis = [index for index, count in enumerate(mrope_section) for _ in range(count)]
        self.frequency_axis = axis

    @torch.no_grad()
    def forward(self, x, position_ids):
        if position_ids.ndim == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        with torch.autocast(device_type=x.device.type if x.device.type != "mps" else "cpu", enabled=False):
            freqs = position_ids[..., None].float() * self.inv_freq.float().to(x.device)  # (3, batch, seq, dim / 2)
            axis = torch.tensor(self.frequency_axis, device=x.device)
            freqs = freqs.gather(0, axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:]))[0]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


@dataclass
class DreamDraftOutput(ModelOutput):
    """Output of [`DreamDraftModel.forward`].

    Args:
        logits: Next-token logits through the target's lm_head, `(batch, seq, vocab)`; `None`
            when `return_logits=False`.
        features: Final draft features after the norm, `(batch, seq, hidden)`: the drafter's
            estimate of the target's last-layer (post-norm) hidden states.
        first_block_hidden: Output of the initial decoder block, regressed during training onto
            the target's entropy-selected intermediate layer.
    """

    logits: torch.Tensor | None = None
    features: torch.Tensor | None = None
    first_block_hidden: torch.Tensor | None = None


# The feature memory grows in steps of this many positions (fewer reallocations while decoding).
MEMORY_GROWTH = 64


class DreamFeatureMemory:
    """Target features the drafter attends to: slot p of row r holds the target's last-layer
    feature at row r's own sequence position p (padding excluded). The one memory of every
    decoding mode (chain, tree, batch) and of training.

    Holds the raw features (for the EAGLE-style `concat` fusion) and, for the cross-attention
    fusion, their key/value projections, computed once per position. Slots are written, not
    appended, because rows sit at different positions. A slot at or after a row's frontier may
    hold a stale value (a rejected draft's feature, or the drafter's own estimate): a query at
    position p reads slots `< p` only, and every slot is rewritten before a query can read it.
    `features` / `keys` / `values` are views of the slots written so far (storage grows in steps
    of `MEMORY_GROWTH`).
    """

    def __init__(self, model: DreamDraftModel, features=None, keys=None, values=None):
        self.model = model
        self._storage = [features, keys, values]  # (rows, capacity, hidden), (rows, kv_heads, capacity, head_dim) x 2
        self.length = 0 if features is None else features.shape[1]

    def __len__(self) -> int:
        return self.length

    @property
    def features(self) -> torch.Tensor | None:
        return self._view(0)

    @property
    def keys(self) -> torch.Tensor | None:
        return self._view(1)

    @property
    def values(self) -> torch.Tensor | None:
        return self._view(2)

    def _view(self, index: int):
        tensor = self._storage[index]
        return None if tensor is None else tensor.narrow(1 if index == 0 else 2, 0, self.length)

    def project(self, features: torch.Tensor):
        """`(features, keys, values)` for `features (rows, n, hidden)`: keys/values are None without cross-attention."""
        features = features.to(self.model.dtype)
        if self.model.cross_block is None:
            return features, None, None
        return (features, *self.model.cross_block.cross_attn.project_memory(features))

    def write(self, features: torch.Tensor, start, keys=None, values=None) -> None:
        """Write `features (rows, n, hidden)` at slots `start[r] .. start[r] + n - 1` of each row
        (`start` an int or a `(rows,)` tensor); `keys`/`values` are their projections if already known."""
        new = self.project(features) if keys is None else (features, keys, values)
        count = new[0].shape[1]
        if torch.is_tensor(start) and start.numel() > 1 and not bool((start == start[0]).all()):
            needed, first = int((start + count).max()), None
        else:  # every row writes the same slots: a slice assignment
            first = int(start.reshape(-1)[0]) if torch.is_tensor(start) else int(start)
            needed = first + count
        capacity = 0 if self._storage[0] is None else self._storage[0].shape[1]
        for index, tensor in enumerate(new):
            if tensor is None:
                continue
            dim = 1 if index == 0 else 2
            stored = self._storage[index]
            if stored is None:
                shape = list(tensor.shape)
                shape[dim] = needed
                stored = tensor.new_zeros(shape)
            elif needed > capacity:
                grow = [0, 0] * (stored.dim() - dim - 1) + [0, max(needed - capacity, MEMORY_GROWTH)]
                stored = F.pad(stored, grow)
            tensor = tensor.to(stored.dtype)
            if first is not None:
                stored.narrow(dim, first, count).copy_(tensor)
            else:
                slots = start.to(stored.device)[:, None] + torch.arange(count, device=stored.device)
                slots = slots[:, None, :, None] if dim == 2 else slots[..., None]
                stored.scatter_(dim, slots.expand(tensor.shape), tensor)
            self._storage[index] = stored
        self.length = max(self.length, needed)

    def append(self, features: torch.Tensor) -> None:
        """Write `features (rows, n, hidden)` at the next n slots."""
        self.write(features, self.length)

    def crop(self, length: int) -> None:
        """Keep only the first `length` slots (no-op if already that short)."""
        self.length = min(self.length, length)

    def select_rows(self, rows: torch.LongTensor) -> None:
        """Keep only `rows`, in that order (finished rows leave the batch)."""
        self._storage = [None if t is None else t.index_select(0, rows.to(t.device)) for t in self._storage]

    def fork(self, rows: torch.LongTensor, length: int) -> DreamFeatureMemory:
        """A new memory whose row i is a copy of row `rows[i]`'s first `length` slots (speculative
        rows, e.g. tree nodes, then write their own ancestors' features after them)."""
        length = min(length, self.length)
        views = [self._view(i) for i in range(3)]
        picked = [None if t is None else t.index_select(0, rows.to(t.device)).narrow(1 if i == 0 else 2, 0, length) for i, t in enumerate(views)]
        return DreamFeatureMemory(self.model, *picked)


class DreamCrossAttention(nn.Module):
    """Queries from the draft's hidden states, keys/values from target features; per-head RMSNorm
    on queries and keys; no rotary embedding (DREAM's choice), or with `config.cross_attention_rope` a 1-D
    rotary embedding by memory slot, applied to the stored keys at attention time."""

    def __init__(self, config: DreamConfig, decoder_config: LlamaConfig):
        super().__init__()
        self.rotary = LlamaRotaryEmbedding(decoder_config) if config.cross_attention_rope else None
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def project_memory(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(keys, values)`, each `(batch, kv_heads, n, head_dim)`, of `features (batch, n, hidden)`; keys RMS-normed.

        Computed once per position when features enter a [`DreamFeatureMemory`], not at every draft step.
        """
        batch, length, _ = features.shape
        keys = self.k_norm(self.k_proj(features).view(batch, length, -1, self.head_dim)).transpose(1, 2)
        values = self.v_proj(features).view(batch, length, -1, self.head_dim).transpose(1, 2)
        return keys, values

    def _rotate(self, states: torch.Tensor, positions: torch.LongTensor) -> torch.Tensor:
        """`states (batch, heads, n, head_dim)` rotated to `positions (batch, n)`."""
        cos, sin = self.rotary(states, positions.expand(states.shape[0], -1))
        return states * cos[:, None] + rotate_half(states) * sin[:, None]

    def forward(self, hidden_states, keys, values, allowed, query_positions=None, key_positions=None) -> torch.Tensor:
        """`allowed (batch, 1, queries, keys)`; with a rotary embedding, `query_positions (batch, queries)` and
        `key_positions (batch or 1, keys)` are the memory slots they score by (ignored without)."""
        batch, length, _ = hidden_states.shape
        queries = self.q_norm(self.q_proj(hidden_states).view(batch, length, -1, self.head_dim)).transpose(1, 2)
        if self.rotary is not None:
            queries, keys = self._rotate(queries, query_positions), self._rotate(keys, key_positions)
        # A zero "null" slot that every query may attend to: the first positions have no earlier
        # feature to look at, and a fully masked softmax row would be NaN.
        null = keys.new_zeros(batch, keys.shape[1], 1, self.head_dim)
        keys, values = torch.cat([null, keys], dim=2), torch.cat([null, values], dim=2)
        allowed = F.pad(allowed, (1, 0), value=True)
        groups = self.num_heads // self.num_key_value_heads
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class DreamCrossAttentionBlock(nn.Module):
    """Cross-attention + MLP, each behind a tanh gate initialised at 0 (Mllama style), so an
    untrained block starts as the identity and learns how much target context to let in."""

    def __init__(self, config: DreamConfig, decoder_config: LlamaConfig):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn = DreamCrossAttention(config, decoder_config)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(decoder_config)
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, hidden_states, keys, values, allowed, query_positions=None, key_positions=None) -> torch.Tensor:
        attended = self.cross_attn(self.input_layernorm(hidden_states), keys, values, allowed, query_positions, key_positions)
        hidden_states = hidden_states + self.attn_gate.tanh() * attended
        return hidden_states + self.mlp_gate.tanh() * self.mlp(self.post_attention_layernorm(hidden_states))


class DreamPreTrainedModel(PreTrainedModel):
    """Base class of DREAM drafters: config class, weight initialisation (cross-attention gates start at 0)."""

    config_class = DreamConfig
    base_model_prefix = "dream"
    _no_split_modules = ["LlamaDecoderLayer", "DreamCrossAttentionBlock"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DreamCrossAttentionBlock):
            init.zeros_(module.attn_gate)
            init.zeros_(module.mlp_gate)


def check_drafter_source(source: str | os.PathLike) -> None:
    """Refuse a drafter source that cannot load, before any work: a folder without `config.json` (transformers
    would build a default-sized drafter first), or a path that exists nowhere and is no Hub repo id."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"No config.json in the drafter folder {path}: it holds no saved drafter. Save one there with "
                "`drafter.save_pretrained(DIR)` (or `hf-dream train`), or point at the folder that holds config.json."
            )
        return
    if path.exists():
        raise FileNotFoundError(f"The drafter {path} is a file: give the folder that holds its config.json and weights.")
    text = str(source)
    if path.is_absolute() or text.startswith((".", "~")) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text):
        raise FileNotFoundError(
            f"Drafter folder not found: {text}. Give an existing folder saved with `save_pretrained`, "
            "or a Hub repository id `owner/name`."
        )


def _default_decoding_options(config: DreamConfig):
    """The drafter's default `DreamDecodingOptions` (an earlier release's config.json may carry them), or
    None where only this file and its siblings are installed (`trust_remote_code`: no DREAM decoding there)."""
    try:
        # imported by name: the code exported for `trust_remote_code` holds only this module's siblings
        options = importlib.import_module("hf_dream.generation.options")
    except ModuleNotFoundError:
        return None
    return options.options_from_config(config)


class DreamDraftModel(DreamPreTrainedModel):
    """A DREAM drafter for one target VLM.

    Use it as `target.generate(**inputs, assistant_model=drafter)` after `import hf_dream`.
    Build a fresh one with [`DreamDraftModel.from_target`], load a trained one with
    `from_pretrained`. After each `generate` call, `last_stats` holds the decoding statistics.
    `decoding_options` (a `DreamDecodingOptions`: draft length, schedule, tree sizes) are this drafter's
    defaults for every call; `generate(..., assistant_model=drafter, num_draft_tokens=3)` overrides them
    for one call.
    """

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        is_cross = config.fusion in CROSS_ATTENTION_FUSIONS
        takes_previous_feature = config.fusion != "cross_attention"  # EAGLE's input: [embedding; previous feature]
        # Two self-attention blocks with a KV cache (cross) or three (concat: the cross-attention
        # block is replaced by a decoder block so both variants have the same depth).
        num_cached = 2 if is_cross else 3
        self.decoder_config = _decoder_config(config, num_cached)
        if config.mrope_section is None:
            self.rotary_emb = LlamaRotaryEmbedding(self.decoder_config)
        else:
            self.rotary_emb = DreamMultimodalRotaryEmbedding(self.decoder_config, config.mrope_section, config.mrope_interleaved)
        self.fusion_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False) if takes_previous_feature else None
        # EAGLE-3-style inputs: several target layers, concatenated, fused to one feature before they enter the memory
        layers = config.feature_layers
        self.feature_fusion = None if layers is None else nn.Linear(len(layers) * config.hidden_size, config.hidden_size, bias=False)
        self.initial_block = LlamaDecoderLayer(self.decoder_config, layer_idx=0)
        # EAGLE convention: the first block sees raw embeddings, no input norm.
        self.initial_block.input_layernorm = nn.Identity()
        self.cross_block = DreamCrossAttentionBlock(config, self.decoder_config) if is_cross else None
        self.middle_block = None if is_cross else LlamaDecoderLayer(self.decoder_config, layer_idx=1)
        self.final_block = LlamaDecoderLayer(self.decoder_config, layer_idx=num_cached - 1)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.draft_vocab_size is not None:
            # target token id of each draft-vocabulary entry; set by `set_draft_vocab`, saved with the drafter
            self.register_buffer("draft_vocab", torch.arange(config.draft_vocab_size), persistent=True)
        else:
            self.draft_vocab = None
        self.target_adapter: TargetAdapter | None = None
        self.last_stats: dict | None = None
        # the input batch row of every row of the drafter's current forward, set by the custom
        # decoding loops (`DrafterState`) for row-keyed test drafters; None otherwise
        self.batch_rows: list[int] | None = None
        # this drafter's default decoding options (`hf_dream.generation.options.DreamDecodingOptions`);
        # each generate() call can override them
        self.decoding_options = _default_decoding_options(config)
        self.post_init()

    # --- target ----------------------------------------------------------------------------
    @classmethod
    def config_for_target(cls, target, **overrides) -> DreamConfig:
        """A [`DreamConfig`] sized for `target` (any supported VLM), with `overrides` applied."""
        adapter = get_target_adapter(target)
        text = adapter.text_config
        rope = getattr(text, "rope_parameters", None) or {}
        if "full_attention" in rope:  # Gemma3 keeps one rope dict per attention type
            rope = rope["full_attention"]
        attention = adapter.attention_shape
        values = dict(
            vocab_size=adapter.vocab_size,
            hidden_size=adapter.hidden_size,
            intermediate_size=text.intermediate_size,
            num_attention_heads=attention.num_attention_heads,
            num_key_value_heads=attention.num_key_value_heads,
            head_dim=attention.head_dim,
            rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
            max_position_embeddings=getattr(text, "max_position_embeddings", 4096),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            mrope_section=adapter.mrope_section,
            mrope_interleaved=adapter.mrope_interleaved,
            entropy_candidate_layers=adapter.entropy_candidate_layers(),
            **adapter.describe(),
        )
        if overrides.get("feature_layers") == "eagle3":  # EAGLE-3's low, middle and high layers
            layers = adapter.num_hidden_layers
            chosen = sorted({min(max(index, 1), layers) for index in (2, layers // 2, layers - 3)})
            overrides = {**overrides, "feature_layers": chosen if len(chosen) > 1 else list(range(1, layers + 1))}
        values.update(overrides)
        return DreamConfig(**values)

    @classmethod
    def from_target(cls, target, **overrides) -> DreamDraftModel:
        """A freshly initialised drafter sized for `target`, attached to it, on its device and dtype.

        `overrides` are [`DreamConfig`] fields, e.g. `fusion="concat"` or `visual_keep_ratio=1.0`, or
        decoding options (`num_draft_tokens=3`), which become the drafter's `decoding_options`.
        """
        names = DECODING_OPTION_NAMES
        options = {name: overrides.pop(name) for name in names if name in overrides}
        drafter = cls(cls.config_for_target(target, **overrides))
        if options:
            drafter.decoding_options = drafter.decoding_options.updated(**options)
        drafter.to(device=target.device, dtype=target.dtype)
        drafter.attach_target(target)
        return drafter

    def check_compatible(self, target) -> TargetAdapter:
        """The adapter for `target`, or a `ValueError` naming what differs from this drafter's config."""
        adapter = get_target_adapter(target)
        expected = {
            "model_type": (self.config.target_model_type, adapter.config.model_type),
            "hidden_size": (self.config.hidden_size, adapter.hidden_size),
            "vocab_size": (self.config.vocab_size, adapter.vocab_size),
        }
        mismatches = [
            f"{name}: drafter built for {mine!r}, target has {theirs!r}"
            for name, (mine, theirs) in expected.items()
            if mine is not None and mine != theirs
        ]
        if mismatches:
            raise ValueError(
                f"This DREAM drafter was built for another target ({self.config.target_name_or_path or 'unknown'}): "
                + "; ".join(mismatches)
                + ". Build a drafter for this target with `DreamDraftModel.from_target(target)`."
            )
        mine, theirs = self.config.target_build, adapter.build_id
        if mine and theirs and mine != theirs:
            warnings.warn(
                f"This DREAM drafter was trained for the target build {mine!r}, but the target is build {theirs!r}: "
                "the output stays exact, but the drafter learned another model's features and will accept fewer tokens. "
                "Use the drafter trained for this build (or retrain one).",
                UserWarning,
                stacklevel=3,
            )
        return adapter

    def attach_target(self, target) -> TargetAdapter:
        """Check `target` and use its input embeddings and lm_head (they stay target modules and
        are never saved with the drafter)."""
        if self.target_adapter is None or self.target_adapter.model is not target:
            self.target_adapter = self.check_compatible(target)
        return self.target_adapter

    def _adapter(self) -> TargetAdapter:
        if self.target_adapter is None:
            raise RuntimeError(
                "This drafter is not attached to a target: call `drafter.attach_target(target)` or use it "
                "through `target.generate(..., assistant_model=drafter)`."
            )
        return self.target_adapter

    # --- forward ---------------------------------------------------------------------------
    @property
    def target_feature_layers(self) -> list[int]:
        """The indices of the target's `hidden_states` this drafter reads (`config.feature_layers`, else the last layer)."""
        if self.config.feature_layers is not None:
            return list(self.config.feature_layers)
        return [self._adapter().num_hidden_layers]

    def fuse_target_features(self, hidden_states) -> torch.Tensor:
        """The drafter's feature of each position, `(batch, n, hidden)`, from the target's `hidden_states` output (a
        tuple indexed by layer; only `target_feature_layers` are read), or from those layers already concatenated
        along the last dimension (`(batch, n, len(feature_layers) * hidden)`: the training inputs)."""
        if torch.is_tensor(hidden_states):
            if self.feature_fusion is None or hidden_states.shape[-1] == self.config.hidden_size:
                return hidden_states
            return self.feature_fusion(hidden_states.to(self.feature_fusion.weight.dtype))
        layers = [hidden_states[index] for index in self.target_feature_layers]
        return layers[0] if self.feature_fusion is None else self.fuse_target_features(torch.cat(layers, dim=-1))

    def new_memory(self, target_features: torch.Tensor | None = None) -> DreamFeatureMemory:
        """An empty [`DreamFeatureMemory`] for this drafter, or one holding `target_features` if given (the target's
        feature per position, or the concatenated `feature_layers`, fused here: `fuse_target_features`)."""
        memory = DreamFeatureMemory(self)
        if target_features is not None:
            memory.write(self.fuse_target_features(target_features), 0)
        return memory

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.LongTensor,
        memory: DreamFeatureMemory | None = None,
        target_features: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        return_logits: bool = True,
        rotary_position_ids: torch.LongTensor | None = None,
        unrolled_steps: int | None = None,
    ) -> DreamDraftOutput | list[DreamDraftOutput]:
        r"""
        Args:
            inputs_embeds (`(batch, seq, hidden)`): Input embeddings as the target sees them
                (image features merged at image positions), possibly with visual tokens pruned.
            position_ids (`(batch, seq)`): Original sequence positions of the inputs (pruned
                positions keep their original ids); also used to index the feature memory:
                position `p` sees target features of positions `< p`.
            memory / target_features: The target's last-layer features, as a
                [`DreamFeatureMemory`] (incremental decoding) or a `(batch, n, hidden)` tensor
                (training: one entry per position).
            attention_mask (`(batch, past + seq)`, optional): 1 for real tokens, 0 for padding.
            cache (`DynamicCache`, optional): The drafter's self-attention cache.
            rotary_position_ids (`(axes, batch, seq)` or `(batch, seq)`, optional): The target's own
                position ids of the inputs for the rotary embedding (`TargetPositions`): 3-D for an
                M-RoPE target (`config.mrope_section`). Default: `position_ids`, which is what a 1-D
                target uses (left padding aside, which the drafter's rotary does not see).
            unrolled_steps (`int`, optional): Training-time test: return [`forward_unrolled`]'s outputs at depths
                1..N instead (with `target_features`, no cache); through `forward` so that DDP wrappers see the call.
        """
        if unrolled_steps is not None:
            if cache is not None or memory is not None or target_features is None:
                raise ValueError("unrolled_steps needs target_features, and no memory or cache (it is a training forward)")
            return self.forward_unrolled(inputs_embeds, position_ids, target_features, unrolled_steps, attention_mask,
                                         return_logits, rotary_position_ids)
        if memory is None:
            memory = self.new_memory(target_features)
        batch, length, _ = inputs_embeds.shape
        past = cache.get_seq_length() if cache is not None else 0
        hidden_states = inputs_embeds.to(self.dtype)
        if self.fusion_proj is not None:
            hidden_states = self.fusion_proj(torch.cat([hidden_states, self._previous_features(memory, position_ids)], -1))
        rotary = position_ids if rotary_position_ids is None else rotary_position_ids
        position_embeddings = self.rotary_emb(hidden_states, position_ids_for_model(rotary) if rotary.ndim == 3 else rotary)
        self_mask = self._self_attention_mask(batch, length, past, attention_mask, hidden_states.device)
        block_kwargs = dict(attention_mask=self_mask, position_embeddings=position_embeddings, cache=cache, use_cache=cache is not None)

        hidden_states = self.initial_block(hidden_states, **block_kwargs)
        first_block_hidden = hidden_states
        if self.cross_block is not None:
            slots = torch.arange(len(memory), device=position_ids.device)
            allowed = slots < position_ids[..., None]
            hidden_states = self.cross_block(hidden_states, memory.keys, memory.values, allowed[:, None], position_ids, slots[None])
        else:
            hidden_states = self.middle_block(hidden_states, **block_kwargs)
        hidden_states = self.final_block(hidden_states, **block_kwargs)
        features = self.norm(hidden_states)
        logits = self.draft_logits(features) if return_logits else None
        return DreamDraftOutput(logits=logits, features=features, first_block_hidden=first_block_hidden)

    def forward_unrolled(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.LongTensor,
        target_features: torch.Tensor,
        steps: int,
        attention_mask: torch.Tensor | None = None,
        return_logits: bool = True,
        rotary_position_ids: torch.LongTensor | None = None,
    ) -> list[DreamDraftOutput]:
        r"""Training-time test: every position drafted at depths 1..`steps` at once, as decoding drafts it.

        At depth `j` the output at input index `p` is the drafter's `j`-th draft of a chain that started at index
        `s = p - j + 1`: its cross-attention reads the target's features of the positions before `s` and, for the
        chain's positions `s .. p - 1`, the drafter's *own* features of depths `1 .. j - 1` (what decoding writes in
        the memory before the target has verified them); its self-attention reads the depth-1 keys of indices `<= s`
        and the chain's own keys of depths `2 .. j` (what the decoding cache holds then). Inputs are the given
        tokens at every depth (teacher forcing). Depth 1 is `forward` itself.

        Arguments as in `forward`; `target_features` is `(batch, n, hidden)` by original position. Returns one
        [`DreamDraftOutput`] per depth. At depth `j` an index is a real chain only if its chain start exists and
        the chain's original positions are consecutive (`unrolled_chain_mask`).
        """
        from transformers import DynamicCache

        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        batch, length, _ = inputs_embeds.shape
        device = inputs_embeds.device
        memory = self.new_memory(target_features)
        embeds = inputs_embeds.to(self.dtype)
        rotary = position_ids if rotary_position_ids is None else rotary_position_ids
        position_embeddings = self.rotary_emb(embeds, position_ids_for_model(rotary) if rotary.ndim == 3 else rotary)
        index = torch.arange(length, device=device)
        keys_valid = torch.ones(batch, length, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        cache = DynamicCache()
        outputs: list[DreamDraftOutput] = []
        own_features: list[torch.Tensor] = []
        own_memory: list[tuple[torch.Tensor, torch.Tensor]] = []
        for step in range(1, steps + 1):
            start = index - (step - 1)  # the chain start of every query index
            # self-attention over the cached depths 1..step-1 and this one: depth 1 up to the chain start, then depth i at s + i - 1
            blocks = [(index[None, :] <= start[:, None])[None] & keys_valid[:, None, :]]
            if step == 1:  # every query sees its own key (a padded query would otherwise see none: NaN)
                blocks[0] = blocks[0] | torch.eye(length, dtype=torch.bool, device=device)[None]
            blocks += [(index[None, :] == (start + depth - 1)[:, None])[None].expand(batch, -1, -1) for depth in range(2, step + 1)]
            self_mask = torch.cat(blocks, dim=-1)[:, None]
            hidden_states = embeds
            if self.fusion_proj is not None:
                previous = self._previous_features(memory, position_ids) if step == 1 else F.pad(own_features[-1], (0, 0, 1, 0))[:, :length]
                hidden_states = self.fusion_proj(torch.cat([hidden_states, previous], -1))
            block_kwargs = dict(attention_mask=self_mask, position_embeddings=position_embeddings, cache=cache, use_cache=True)
            hidden_states = self.initial_block(hidden_states, **block_kwargs)
            first_block_hidden = hidden_states
            if self.cross_block is not None:
                slots = torch.arange(len(memory), device=device)
                target_allowed = slots < (position_ids - (step - 1))[..., None]
                own_allowed = [(index[None, :] == (start + depth - 1)[:, None])[None].expand(batch, -1, -1) for depth in range(1, step)]
                keys = torch.cat([memory.keys] + [k for k, _ in own_memory], dim=2)
                values = torch.cat([memory.values] + [v for _, v in own_memory], dim=2)
                allowed = torch.cat([target_allowed, *own_allowed], dim=-1)
                # the drafter's own feature at index i sits, in decoding's memory, in the slot of i's position
                key_positions = torch.cat([slots[None].expand(batch, -1), *[position_ids] * (step - 1)], dim=-1)
                hidden_states = self.cross_block(hidden_states, keys, values, allowed[:, None], position_ids, key_positions)
            else:
                hidden_states = self.middle_block(hidden_states, **block_kwargs)
            hidden_states = self.final_block(hidden_states, **block_kwargs)
            features = self.norm(hidden_states)
            outputs.append(DreamDraftOutput(logits=self.draft_logits(features) if return_logits else None, features=features,
                                            first_block_hidden=first_block_hidden))
            own_features.append(features)
            if self.cross_block is not None and step < steps:
                own_memory.append(self.cross_block.cross_attn.project_memory(features))
        return outputs

    @staticmethod
    def unrolled_chain_mask(position_ids: torch.LongTensor, step: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`(batch, seq)`: where depth `step` of `forward_unrolled` is a chain decoding could draft: its start index
        exists, is real, and the chain's original positions are consecutive (no pruned visual token inside)."""
        batch, length = position_ids.shape
        start = torch.arange(length, device=position_ids.device) - (step - 1)
        exists = (start >= 0)[None].expand(batch, -1)
        first = position_ids.gather(1, start.clamp(min=0)[None].expand(batch, -1))
        mask = exists & (position_ids - first == step - 1)
        if attention_mask is not None:
            real = attention_mask.bool()
            mask = mask & real & real.gather(1, start.clamp(min=0)[None].expand(batch, -1))
        return mask

    def draft_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary (the target's whole vocabulary unless reduced)."""
        adapter = self._adapter()
        return adapter.logits(features.to(adapter.lm_head.weight.dtype), rows=self.draft_vocab)

    def to_target_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits scattered into the target's vocabulary (-inf elsewhere), so
        that logits processors and speculative sampling see target token ids."""
        if self.draft_vocab is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.draft_vocab, logits)

    def set_draft_vocab(self, token_ids) -> None:
        """Use these target token ids (length `config.draft_vocab_size`, distinct) as the draft vocabulary."""
        token_ids = torch.as_tensor(token_ids, dtype=torch.long)
        if self.draft_vocab is None or token_ids.shape != self.draft_vocab.shape:
            raise ValueError(f"Expected {self.config.draft_vocab_size} token ids (config.draft_vocab_size), got {tuple(token_ids.shape)}.")
        if token_ids.unique().numel() != token_ids.numel() or token_ids.min() < 0 or token_ids.max() >= self.config.vocab_size:
            raise ValueError(f"Draft vocabulary ids must be distinct target ids in [0, {self.config.vocab_size}).")
        self.draft_vocab.copy_(token_ids.to(self.draft_vocab.device))

    @staticmethod
    def _previous_features(memory: DreamFeatureMemory, position_ids: torch.LongTensor) -> torch.Tensor:
        """Target feature of position `p - 1` for each input position `p` (zeros at `p = 0`)."""
        features = F.pad(memory.features, (0, 0, 1, 0))  # index 0 is the zero feature of "position -1"
        index = position_ids.clamp(max=features.shape[1] - 1)
        return torch.gather(features, 1, index[..., None].expand(-1, -1, features.shape[-1]))

    @staticmethod
    def _self_attention_mask(batch, length, past, attention_mask, device) -> torch.Tensor | None:
        """Boolean `(batch, 1, seq, past + seq)` mask, causal over the drafter's own sequence
        (kept tokens are in order, so causality by index is causality by position)."""
        if length == 1 and attention_mask is None:
            return None
        total = past + length
        mask = torch.ones(length, total, dtype=torch.bool, device=device).tril(diagonal=past)
        mask = mask[None, None].expand(batch, 1, length, total)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, -total:].bool()
            # Every query may see its own key: a padded query would otherwise see no key at all,
            # and its NaN output would reach real queries through the cache (0 * NaN = NaN).
            # Real queries are unaffected (their own key is real and causal anyway).
            own = torch.arange(length, device=device)
            mask[:, :, own, past + own] = True  # `mask` is a fresh tensor here (the `&` above)
        return mask

    # --- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`, but weights that do not match the config
        (missing, unexpected or mis-shaped tensors) are an error, not a silent re-initialisation."""
        want_info = kwargs.pop("output_loading_info", False)
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if isinstance(source, (str, os.PathLike)):
            check_drafter_source(source)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {key: sorted(info.get(key) or []) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {key: value for key, value in problems.items() if value}
        if problems:
            raise ValueError(f"The drafter's weights do not match its config: {problems}")
        return (model, info) if want_info else model

    # --- the Hub ----------------------------------------------------------------------------
    def push_to_hub(
        self,
        repo_id: str,
        *,
        license: str | None = None,
        base_model: str | None = None,
        benchmark_jsons=(),
        tags: list[str] | None = None,
        save_directory=None,
        dry_run: bool = False,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str = "50GB",
    ):
        """Upload this drafter with its model card, after the same checks as `hf-dream push`.

        Unlike the inherited method, nothing goes up unchecked: the drafter is saved (to
        `save_directory`, or a temporary folder), its card rendered (`license` is required: the
        target's licence applies to its drafter), and the folder passes `hf_dream.hub.check_folder`
        (safetensors only, no target weights, weights that match the config, a valid card) before
        one commit uploads exactly the checked files. `dry_run=True` checks and lists them without
        network access. Returns a `hf_dream.hub.PushResult`.
        """
        # imported by name: the code exported for `trust_remote_code` users holds only this module's
        # siblings (hf_dream.hub.remote_code), and pushing with hf-dream's checks needs hf-dream itself
        try:
            push_drafter = importlib.import_module("hf_dream.hub.push").push_drafter
        except ModuleNotFoundError as error:
            raise ImportError(f"push_to_hub checks the drafter with hf-dream's Hub tools: `pip install hf-dream` ({error})") from None
        return push_drafter(
            self, repo_id, license=license, base_model=base_model, benchmark_jsons=benchmark_jsons, tags=tags,
            save_directory=save_directory, max_shard_size=max_shard_size, dry_run=dry_run, commit_message=commit_message,
            commit_description=commit_description, private=private, token=token, revision=revision, create_pr=create_pr,
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`, but `push_to_hub=True` is refused: that upload would skip
        hf-dream's checks. Save, then call `drafter.push_to_hub(repo_id, license=...)` or `hf-dream push`."""
        # transformers' order: save_directory, is_main_process, state_dict, push_to_hub, ...
        if kwargs.get("push_to_hub", args[2] if len(args) > 2 else False):
            raise ValueError(
                "save_pretrained(push_to_hub=True) would upload without hf-dream's checks: call "
                "`drafter.push_to_hub(repo_id, license=...)` instead, or save and run "
                "`hf-dream push --folder DIR --repo-id OWNER/NAME`."
            )
        return super().save_pretrained(save_directory, *args, **kwargs)
