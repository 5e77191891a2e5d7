"""Dynamic-tree drafting (EAGLE-2 style) with lossless verification in one target pass.

Use it through transformers' public `custom_generate` hook (any batch size):

```python
from hf_dream.generation.tree import tree_generate

out = target.generate(**inputs, custom_generate=tree_generate, drafter=drafter, max_new_tokens=64)
```

(`assistant_model` is dropped by transformers on the `custom_generate` path, hence `drafter=`.)

**Draft** (`TreeDrafter.draft`): from the last token (the *root*), expand the `tree_top_k` most
probable children of the `tree_top_k` best frontier nodes, level by level, ranking nodes by
cumulative draft log-probability (after the target's logits processors, each node with its own
prefix), down to `tree_depth`; keep the global top `tree_total_tokens` nodes. Each level is one
batched drafter forward: row r holds one frontier node whose drafter cache and feature memory
are the row's verified prefix plus that node's own ancestors (the drafter's own features stand
in for the target's there). Verification, acceptance (children as point-mass proposals, exactly
lossless as in EAGLE and SpecInfer), cache compaction and the rest are the shared engine's
(`hf_dream.generation.engine`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .cost_model import TreeSize
from .drafter_state import DrafterState
from .engine import DraftTree, Verification, process_rows, speculative_generate, tree_depths, verify
from .kv_cache import RaggedCache, compact_cache  # noqa: F401  (compact_cache: re-exported, public since the first tree release)
from .options import resolve_options
from .validation import check_dream_call


# ---------------------------------------------------------------------------------------------
# Drafting
# ---------------------------------------------------------------------------------------------
@dataclass
class _NodeState:
    """What the drafter left behind for one expanded node, needed by its descendants."""

    feature: torch.Tensor  # (1, hidden): the drafter's estimate of the target feature at this node
    memory_key: torch.Tensor | None  # (kv_heads, 1, head_dim) cross-attention projection of `feature`
    memory_value: torch.Tensor | None
    layer_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per drafter cache layer: (kv_heads, 1, head_dim)


class _CandidatePool:
    """Every node drafted in one round, in creation order (so parents precede children)."""

    def __init__(self, device):
        self.device = device
        self.tokens: list[int] = []
        self.parents: list[int] = []  # -1: the root
        self.ranks: list[int] = []
        self.scores = torch.empty(0, device=device)
        self.states: dict[int, _NodeState] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def add_children(self, parents: list[int], tokens: torch.Tensor, scores: torch.Tensor) -> list[int]:
        """Add `tokens[r, j]` as the j-th ranked child of `parents[r]`; drops impossible ones (-inf)."""
        new_ids, keep = [], torch.isfinite(scores)
        for row, parent in enumerate(parents):
            for rank, (token, ok) in enumerate(zip(tokens[row].tolist(), keep[row].tolist())):
                if not ok:
                    continue
                new_ids.append(len(self.tokens))
                self.tokens.append(token)
                self.parents.append(parent)
                self.ranks.append(rank)
        self.scores = torch.cat([self.scores, scores[keep]])
        return new_ids

    def path(self, node: int) -> list[int]:
        """Pool ids from depth 1 down to `node`."""
        path = []
        while node != -1:
            path.append(node)
            node = self.parents[node]
        return path[::-1]


def top_children(log_probs: torch.Tensor, parent_scores: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top_k` most probable next tokens of every row and their cumulative scores.

    Args:
        log_probs: `(rows, vocab)` draft log-probabilities after the logits processors.
        parent_scores: `(rows,)` cumulative log-probabilities of the rows' nodes.
    """
    values, tokens = log_probs.topk(min(top_k, log_probs.shape[-1]), dim=-1)
    # log_softmax is <= 0 mathematically; the clamp keeps every child <= its parent numerically,
    # which is what makes the global top-N selection closed under ancestors.
    return tokens, parent_scores[:, None] + values.clamp(max=0.0)


def select_frontier(scores: torch.Tensor, tokens: list[int], ids: list[int], top_k: int, eos_token_ids) -> list[int]:
    """Among the newly created nodes `ids`, the `top_k` best by score that may still grow
    (a drafted EOS ends its branch: nothing after it can ever be accepted)."""
    growable = [i for i in ids if eos_token_ids is None or tokens[i] not in eos_token_ids]
    if not growable:
        return []
    order = scores[growable].topk(min(top_k, len(growable))).indices.tolist()
    return [growable[i] for i in order]


def select_tree_nodes(scores: torch.Tensor, parents: list[int], total: int) -> list[int]:
    """The global top-`total` nodes by cumulative score, as ascending pool ids.

    Scores never increase from parent to child and a stable sort keeps the (earlier-created)
    parent first on ties, so the selection already contains every ancestor of a selected node;
    the filter below only guards against it ever not doing so.
    """
    order = torch.sort(scores, descending=True, stable=True).indices[:total].tolist()
    chosen = set()
    for node in sorted(order):
        if parents[node] == -1 or parents[node] in chosen:
            chosen.add(node)
    return sorted(chosen)


def _stack(lineages: list[list[_NodeState]], pick, dim: int) -> torch.Tensor:
    """`(rows, ...)`: per row, the picked tensors of its nodes concatenated along `dim` (the sequence)."""
    return torch.stack([torch.cat([pick(node) for node in line], dim=dim) for line in lineages])


class TreeDrafter:
    """Runs a [`DreamDraftModel`] over the frontier of a draft tree, for one row of a batch at a time.

    The verified state (the drafter's KV cache and its feature memory, both holding only tokens
    whose target features are known) lives in the [`DrafterState`] `state` and is never touched
    here; every tree node's speculative state is kept aside in the candidate pool, so nothing has
    to be cropped after verification.
    """

    def __init__(self, state: DrafterState, logits_processor, eos_token_ids, batch_size: int = 1):
        self.state = state
        self.drafter = state.drafter
        self.adapter = state.adapter
        self.logits_processor = logits_processor
        self.eos_token_ids = eos_token_ids
        self.batch_size = batch_size

    def draft(self, row: int, sequence: torch.LongTensor, output, top_k: int, depth: int, total: int) -> DraftTree:
        """Draft one tree below the last token of row `row` of the state.

        Args:
            sequence: `(T,)` the row's sequence so far (padded prompt and tokens); its last token is the root.
            output: the drafter's output whose last column is every row's root (its features and
                logits were computed with the target's real features only).
        """
        device = self.state.lengths.device
        if depth <= 0:
            return DraftTree.from_parents(sequence[-1:].to(device), [-1])
        pool = _CandidatePool(device)
        root = self._node_states(output.features[row : row + 1, -1], [[]])[0]
        log_probs = self._log_probs(row, [sequence], output.logits[row : row + 1, -1])
        tokens, scores = top_children(log_probs, torch.zeros(1, device=device), top_k)
        new_ids = pool.add_children([-1], tokens, scores)
        for level in range(1, depth):
            frontier = select_frontier(pool.scores, pool.tokens, new_ids, top_k, self.eos_token_ids)
            if not frontier:
                break
            level_output, layer_kv = self._forward_frontier(row, pool, root, frontier, level)
            row_kv = [[(keys[r], values[r]) for keys, values in layer_kv] for r in range(len(frontier))]
            pool.states.update(zip(frontier, self._node_states(level_output.features[:, -1], row_kv)))
            prefixes = [torch.cat([sequence, torch.tensor([pool.tokens[n] for n in pool.path(node)])]) for node in frontier]
            log_probs = self._log_probs(row, prefixes, level_output.logits[:, -1])
            tokens, scores = top_children(log_probs, pool.scores[frontier], top_k)
            new_ids = pool.add_children(frontier, tokens, scores)
        return self._to_tree(int(sequence[-1]), pool, total)

    # --- helpers ---------------------------------------------------------------------------
    def _log_probs(self, row: int, prefixes: list[torch.Tensor], logits):
        """Draft log-probabilities after the target's logits processors, each node with its own prefix."""
        logits = self.drafter.to_target_vocab(logits.float())
        rows = [self.state.rows[row]] * len(prefixes)
        return process_rows(self.logits_processor, logits, prefixes, rows, self.batch_size).log_softmax(dim=-1)

    def _node_states(self, features, layer_kv: list[list]) -> list[_NodeState]:
        """Node states of a batch of rows: features `(rows, hidden)`, per-row drafter KV; the
        cross-attention projections are computed once here, as the memory does on write."""
        features = features.to(self.drafter.dtype)
        keys = values = [None] * len(features)
        if self.drafter.cross_block is not None:
            keys, values = self.drafter.cross_block.cross_attn.project_memory(features[:, None])
        return [_NodeState(features[r : r + 1], keys[r], values[r], layer_kv[r]) for r in range(len(features))]

    def _forward_frontier(self, row: int, pool, root: _NodeState, frontier: list[int], level: int):
        """One batched drafter forward: forward row r is frontier node r at depth `level`."""
        rows = len(frontier)
        paths = [[pool.states[a] for a in pool.path(node)[:-1]] for node in frontier]  # depths 1 .. level-1
        memory = self._memory_rows(row, rows, root, paths)
        cache = self._cache_rows(row, rows, paths)
        device = self.state.lengths.device
        tokens = torch.tensor([[pool.tokens[node]] for node in frontier], device=device)
        positions = torch.full((rows, 1), int(self.state.lengths[row]) - 1 + level, dtype=torch.long, device=device)
        rotary = self.state.positions.after_prompt(positions, row)
        output = self.state.forward(
            self.adapter.embed(tokens), positions, memory=memory, cache=cache, rows=[self.state.rows[row]] * rows, rotary=rotary
        )
        layer_kv = [(layer.keys[:, :, -1:], layer.values[:, :, -1:]) for layer in cache.cache.layers]
        return output, layer_kv

    def _memory_rows(self, row: int, rows: int, root: _NodeState, paths: list[list[_NodeState]]):
        """The row's verified features + the root's and each node's ancestors' draft features (position order)."""
        base = self.state.memory.fork(torch.tensor([row]), int(self.state.lengths[row]) - 1)
        lineages = [[root] + path for path in paths]
        features = torch.cat([base.features.expand(rows, -1, -1), _stack(lineages, lambda n: n.feature, 0)], dim=1)
        keys = values = None
        if base.keys is not None:
            keys = torch.cat([base.keys.expand(rows, -1, -1, -1), _stack(lineages, lambda n: n.memory_key, 1)], dim=2)
            values = torch.cat([base.values.expand(rows, -1, -1, -1), _stack(lineages, lambda n: n.memory_value, 1)], dim=2)
        return type(base)(self.drafter, features, keys, values)

    def _cache_rows(self, row: int, rows: int, paths: list[list[_NodeState]]) -> RaggedCache:
        """A fresh drafter cache whose row r is the row's verified cache followed by node r's ancestors.
        (The verified part is copied once per level: the drafter's layers take no tree mask.)"""
        cache = DynamicCache()
        for index, layer in enumerate(self.state.cache.cache.layers):
            keys, values = layer.keys[row : row + 1].expand(rows, -1, -1, -1), layer.values[row : row + 1].expand(rows, -1, -1, -1)
            if paths[0]:  # every node has the same number of ancestors (one level at a time)
                keys = torch.cat([keys, _stack(paths, lambda n, i=index: n.layer_kv[i][0], 1)], dim=2)
                values = torch.cat([values, _stack(paths, lambda n, i=index: n.layer_kv[i][1], 1)], dim=2)
            cache.update(keys, values, index)
        valid = self.state.cache.valid[row : row + 1].expand(rows, -1)
        return RaggedCache(cache, torch.cat([valid, valid.new_ones(rows, len(paths[0]))], dim=1))

    @staticmethod
    def _to_tree(root_token: int, pool: _CandidatePool, total: int) -> DraftTree:
        chosen = select_tree_nodes(pool.scores, pool.parents, total) if len(pool) else []
        index = {node: i + 1 for i, node in enumerate(chosen)}
        parents = [-1] + [index.get(pool.parents[node], 0) for node in chosen]
        tokens = torch.tensor([root_token] + [pool.tokens[node] for node in chosen], device=pool.device)
        return DraftTree.from_parents(tokens, parents, [0] + [pool.ranks[node] for node in chosen])


# ---------------------------------------------------------------------------------------------
# generate()
# ---------------------------------------------------------------------------------------------
def tree_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    drafter=None,
    tree_top_k: int | None = None,
    tree_depth: int | None = None,
    tree_total_tokens: int | str | None = None,
    tree_streamer=None,
    tokenizer=None,
    decoding_options=None,
    **model_kwargs,
):
    """DREAM decoding with EAGLE-2-style dynamic trees, for `generate(custom_generate=...)`.

    Call it as `target.generate(**inputs, custom_generate=tree_generate, drafter=drafter, ...)`;
    transformers prepares inputs, images (`mm_encoder_outputs`), the cache, logits processors and
    stopping criteria, then hands them here. A batch drafts one tree per row and verifies them all
    in one target pass (rows left-padded, lossless per row, as [`batched_generate`]).

    Args:
        drafter (`DreamDraftModel`): the drafter (transformers drops `assistant_model` on this path).
        tree_top_k (`int`, *optional*): children expanded per node, and frontier nodes expanded per level.
        tree_depth (`int`, *optional*): longest drafted path (tokens after the last one).
        tree_total_tokens (`int` or `"auto"`, *optional*): drafted nodes verified per target pass (the root comes
            on top). `"auto"` times target passes over 1..64 new tokens and a drafter step on this
            machine once (cached) and picks the size, depth and top-k with the best expected
            tokens per second (see `hf_dream.generation.cost_model`), then picks again every few
            passes from the acceptance observed so far (remembered for the next call with the same
            target and drafter); the choices are in
            `drafter.last_stats["tree_size"]` (`history`: each size and the slope that chose it).
            Unset tree options come from `decoding_options`, else from `drafter.decoding_options`
            (library defaults: 4, 5 and 16; see [`DreamDecodingOptions`]).
        decoding_options (`DreamDecodingOptions`, *optional*): this call's options instead of the
            drafter's; the `tree_*` arguments override single fields.
        tree_streamer: where the streamer arrives: transformers 5.24 does not pass `streamer` to a
            `custom_generate` callable, so `import hf_dream` makes `generate(streamer=...)` forward
            it here (it gets the prompt, every accepted token and `end()`).
        tokenizer: only read by transformers, to build the `stop_strings` criterion (`import hf_dream`
            keeps it for this loop, which transformers would otherwise drop).

    Returns:
        The sequences (`LongTensor`), or a `GenerateDecoderOnlyOutput` (`sequences`, plus
        `scores` / `logits` of the new tokens when asked) with `return_dict_in_generate=True`.
        Decoding statistics are in `drafter.last_stats` (as for chain drafting, plus
        `side_branch_tokens`: accepted tokens that were not their parent's top draft; with the
        batch keys of [`batched_generate`] for a batch of more than one).
    """
    check_dream_call(
        model, drafter, generation_config, usage="`target.generate(..., custom_generate=tree_generate, drafter=drafter)`",
        custom_mask="Tree verification passes a custom 4-D attention mask",
    )
    options = resolve_options(drafter, decoding_options, tree_top_k=tree_top_k, tree_depth=tree_depth, tree_total_tokens=tree_total_tokens)
    settings = TreeSize(options.tree_top_k, options.tree_depth, options.tree_total_tokens)
    return speculative_generate(
        model, input_ids, logits_processor, stopping_criteria, generation_config, drafter, model_kwargs,
        tree=settings, streamer=tree_streamer if tree_streamer is not None else streamer, batched_stats=input_ids.shape[0] > 1,
        options=options,
    )


def verify_tree(model, cache, tree: DraftTree, root_position: int, last_layer: int, visible=None, drafter=None) -> Verification:
    """Run one tree (batch 1) through the target in one forward (see [`engine.verify`]); `visible`:
    which cache entries are real (default: all). The features are layer `last_layer`'s, or with `drafter` the ones it
    reads (`DreamDraftModel.fuse_target_features`)."""
    valid = torch.ones(1, cache.get_seq_length(), dtype=torch.bool) if visible is None else visible[None]
    device = tree.tokens.device
    depths = tree_depths([tree]).to(device)
    layers, fuse = ([last_layer], None) if drafter is None else (drafter.target_feature_layers, drafter.fuse_target_features)
    return verify(model, RaggedCache(cache, valid.to(device)), [tree], depths, root_position + depths[None], layers, fuse)
