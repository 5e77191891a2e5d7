"""What hf-dream reads from a target: attention probabilities recomputed from a layer's inputs,
visual-token importance and attention entropy.

The target itself always runs with its own (usually SDPA) attention, which returns no
probabilities. Instead of forcing the whole target to eager attention, we record the inputs of
the few attention modules we need and recompute their probabilities here, in float32.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


class AttentionInputRecorder:
    """Records `(hidden_states, position_embeddings)` entering attention modules during a forward.

    Use as a context manager, or call `start()` / `stop()` around a forward that you do not call
    yourself (the generate loop's prefill). Only forwards run by the thread that called `start()`
    are recorded: another thread decoding with the same target at the same time (its own
    recorder on the same module) never overwrites this one's record.
    """

    def __init__(self, modules: dict[int, nn.Module]):
        self.modules = modules
        self.inputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._handles = []
        self._thread: int | None = None

    def start(self) -> AttentionInputRecorder:
        """Register a forward pre-hook on every module; returns `self`. Each forward of this thread
        overwrites `inputs[key]`."""
        self._thread = threading.get_ident()
        for key, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(key), with_kwargs=True))
        return self

    def stop(self) -> None:
        """Remove the hooks (the recorded `inputs` are kept)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, key: int):
        def hook(module, args, kwargs):
            if threading.get_ident() != self._thread:
                return
            hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.inputs[key] = (hidden_states.detach(), kwargs.get("position_embeddings"))

        return hook

    def __enter__(self) -> AttentionInputRecorder:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # cos/sin: (batch, seq, head_dim), x: (batch, heads, seq, head_dim)
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def attention_scores(
    attention: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Queries and keys of a Llama-style attention module (Llama, Mistral, Qwen2, Gemma3 text),
    recomputed from its input: projections, optional per-head q/k norms, rotary embedding.
    Returns `(queries (b, heads, n, d), keys (b, heads, n, d), scaling)` in float32."""
    batch, length, _ = hidden_states.shape
    head_dim = attention.head_dim
    queries = attention.q_proj(hidden_states).view(batch, length, -1, head_dim)
    keys = attention.k_proj(hidden_states).view(batch, length, -1, head_dim)
    if getattr(attention, "q_norm", None) is not None:
        queries = attention.q_norm(queries)
    if getattr(attention, "k_norm", None) is not None:
        keys = attention.k_norm(keys)
    queries, keys = queries.transpose(1, 2).float(), keys.transpose(1, 2).float()
    if position_embeddings is not None:
        cos, sin = (t.float() for t in position_embeddings)
        queries, keys = _apply_rotary(queries, cos, sin), _apply_rotary(keys, cos, sin)
    groups = queries.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)
    scaling = getattr(attention, "scaling", None) or 1.0 / math.sqrt(head_dim)
    return queries, keys, scaling


def iter_attention_probs(attention, hidden_states, position_embeddings, heads_per_chunk: int = 8):
    """Yields causal attention probabilities `(b, h_chunk, n, n)` (float32), a few heads at a time
    so that long multimodal prompts do not need all heads' n x n maps at once."""
    queries, keys, scaling = attention_scores(attention, hidden_states, position_embeddings)
    length = queries.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool, device=queries.device).tril()
    softcap = getattr(attention, "attn_logit_softcapping", None)
    for start in range(0, queries.shape[1], heads_per_chunk):
        scores = queries[:, start : start + heads_per_chunk] @ keys[:, start : start + heads_per_chunk].transpose(-1, -2)
        scores = scores * scaling
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        yield scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


def attention_received(attention, hidden_states, position_embeddings, query_mask=None) -> torch.Tensor:
    """Total attention each position receives in this layer, summed over heads and queries
    (only the queries where `query_mask` is true, e.g. not padding): (b, n)."""
    total = None
    for probs in iter_attention_probs(attention, hidden_states, position_embeddings):
        if query_mask is not None:
            probs = probs * query_mask[:, None, :, None].to(probs.dtype)
        received = probs.sum(dim=(1, 2))
        total = received if total is None else total + received
    return total


def attention_entropy(attention, hidden_states, position_embeddings) -> torch.Tensor:
    """Per-query attention entropy of this layer, averaged over heads: (b, n)."""
    total, num_heads = None, 0
    for probs in iter_attention_probs(attention, hidden_states, position_embeddings):
        entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1).sum(dim=1)
        total = entropy if total is None else total + entropy
        num_heads += probs.shape[1]
    return total / num_heads


def select_visual_tokens(importance: torch.Tensor, image_mask: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Boolean mask (b, n) of the positions the drafter keeps: every text position, plus the
    `ceil(keep_ratio * n_visual)` visual positions that receive the most attention."""
    keep = ~image_mask
    if keep_ratio >= 1.0:
        return torch.ones_like(image_mask)
    for row in range(image_mask.shape[0]):
        visual = image_mask[row].nonzero().squeeze(-1)
        if visual.numel() == 0:
            continue
        num_keep = math.ceil(keep_ratio * visual.numel())
        top = importance[row, visual].topk(num_keep).indices
        keep[row, visual[top]] = True
    return keep


@contextmanager
def recording_attention_inputs(layers: nn.ModuleList, layer_ids):
    """Context manager recording the inputs of `layers[i].self_attn` for every i in `layer_ids`."""
    recorder = AttentionInputRecorder({i: layers[i].self_attn for i in layer_ids})
    with recorder:
        yield recorder


@dataclass
class TeacherSignals:
    """What one teacher-forced target pass gives the drafter's training.

    Args:
        input_embeds: The target's input embeddings with image features merged, `(b, n, H)`.
        features: Last-layer (post-final-norm) hidden states, `(b, n, H)`.
        logits: The target's logits, `(b, n, V)`.
        mid_features: Per token, the hidden state entering the selected intermediate layer
            (entropy-selected or static), `(b, n, H)`; `None` if no intermediate supervision.
        mid_layers: The selected layer per token, `(b, n)`.
        keep: Positions the drafter sees after visual-token compression, `(b, n)`.
        feature_inputs: With `feature_layers`: those hidden states concatenated, `(b, n, k * H)`, the input of
            an EAGLE-3-style drafter's feature fusion; `None` otherwise (the drafter reads `features`).
        importance: With `read_teacher(with_importance=True)`: the attention each position receives in the last
            layer, the visual-token ranking, `(b, n)`; `None` otherwise.
        top1: The target's greedy next token at every position (the argmax of its full-vocabulary logits), `(b, n)`.
        logit_rows: `None` when `logits` covers the whole vocabulary; else the vocabulary ids (a reduced draft
            vocabulary) its last dimension holds, in that order.
    """

    input_embeds: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor
    mid_features: torch.Tensor | None
    mid_layers: torch.Tensor | None
    keep: torch.Tensor
    feature_inputs: torch.Tensor | None = None
    importance: torch.Tensor | None = None
    top1: torch.Tensor | None = None
    logit_rows: torch.Tensor | None = None


def select_layers_by_entropy(entropies: torch.Tensor, candidate_layers: list[int]) -> torch.Tensor:
    """Per token, the candidate layer with the lowest attention entropy.

    `entropies` is `(num_candidates, b, n)` in the order of `candidate_layers`; ties go to the
    shallower layer (the first minimum). Returns layer ids `(b, n)`.
    """
    index = entropies.argmin(dim=0)
    return torch.as_tensor(candidate_layers, device=entropies.device)[index]


BATCH_METADATA = ("prompt_lengths", "sequence_lengths", "row_key")
"""Keys of a training batch that are not target inputs (`DreamDataCollator` adds them)."""


def read_teacher(
    adapter,
    inputs: dict,
    candidate_layers: list[int] | None = None,
    static_layer: int | None = None,
    keep_ratio: float = 1.0,
    feature_layers: list[int] | None = None,
    with_importance: bool = False,
) -> TeacherSignals:
    """One teacher-forced pass of the target (`adapter.model`) on `inputs`, without gradients.

    With `candidate_layers`, every token is supervised by the candidate layer whose attention
    has the lowest entropy at that token (DREAM); with `static_layer`, by that fixed layer
    (ablation); with neither, there is no intermediate supervision. Visual tokens are ranked by
    the attention they receive in the last layer, as at inference. With `feature_layers` (an EAGLE-3-style
    drafter's), `feature_inputs` holds those hidden states concatenated. With `with_importance`, `importance`
    holds that ranking's scores whatever `keep_ratio` (what `TeacherCache` stores to choose the kept tokens later).
    """
    model, layers = adapter.model, adapter.decoder_layers
    last = adapter.num_hidden_layers
    candidates = list(candidate_layers or [])
    image_mask = adapter.image_token_mask(inputs["input_ids"])
    compress = keep_ratio < 1.0 and bool(image_mask.any())
    rank_visual = (compress or with_importance) and bool(image_mask.any())
    recorded = candidates + ([last - 1] if rank_visual else [])
    model_inputs = {k: v for k, v in inputs.items() if k not in BATCH_METADATA}
    with torch.no_grad(), recording_attention_inputs(layers, sorted(set(recorded))) as recorder:
        # All layers (not a list of indices): with pixel_values the flag also reaches the vision
        # tower, which needs its own penultimate layer.
        out = model(**model_inputs, output_hidden_states=True)
        hidden = out.hidden_states
        query_mask = model_inputs.get("attention_mask")
        selected = mid_features = None
        if candidates:
            entropies = torch.stack([attention_entropy(layers[l].self_attn, *recorder.inputs[l]) for l in candidates])
            selected = select_layers_by_entropy(entropies, candidates)
            stacked = torch.stack([hidden[l] for l in candidates])  # (C, b, n, H)
            index = entropies.argmin(dim=0)[None, ..., None].expand(1, *stacked.shape[1:])
            mid_features = stacked.gather(0, index)[0]
        elif static_layer is not None:
            mid_features = hidden[static_layer]
            selected = torch.full(image_mask.shape, static_layer, device=image_mask.device)
        keep, importance = torch.ones_like(image_mask), None
        if rank_visual:
            importance = attention_received(layers[last - 1].self_attn, *recorder.inputs[last - 1], query_mask=query_mask)
        if compress:
            keep = select_visual_tokens(importance, image_mask, keep_ratio)
    feature_inputs = None if feature_layers is None else torch.cat([hidden[layer] for layer in feature_layers], dim=-1)
    return TeacherSignals(
        input_embeds=hidden[0], features=hidden[last], logits=out.logits, mid_features=mid_features, mid_layers=selected, keep=keep,
        feature_inputs=feature_inputs, importance=importance if with_importance else None, top1=out.logits.argmax(-1),
    )
