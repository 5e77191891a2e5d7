"""Dynamic-tree drafting (EAGLE-2 style) with lossless verification in one target pass.

Use it through transformers' public `custom_generate` hook:

```python
from hf_dream.generation.tree import tree_generate

out = target.generate(**inputs, custom_generate=tree_generate, drafter=drafter, max_new_tokens=64)
```

(`assistant_model` is dropped by transformers on the `custom_generate` path, hence `drafter=`.)

One round:
1. **Draft** (`TreeDrafter.draft`): from the last token (the *root*), expand the `tree_top_k`
   most probable children of the `tree_top_k` best frontier nodes, level by level, ranking nodes
   by cumulative draft log-probability (after the target's logits processors, each node with its
   own prefix), down to `tree_depth`; keep the global top `tree_total_tokens` nodes. Each level is one batched drafter forward: row r holds one
   frontier node whose drafter cache and cross-attention memory are the verified prefix plus
   that node's own ancestors (the drafter's own features stand in for the target's there).
2. **Verify** (`verify_tree`): the target runs the root and every node in one forward with a
   4-D attention mask (a node sees the cached past, its ancestors and itself) and position ids
   offset by depth.
3. **Accept** (`greedy_walk` / `sampling_walk`): walk down from the root. Greedy: follow the
   child equal to the target's argmax. Sampling: try the children in draft order against the
   target distribution, each as a point-mass proposal (accept with probability p(token), else
   continue with the residual p without that token): exactly lossless for deterministically
   chosen children, as in EAGLE and SpecInfer. The token after the last accepted node (the
   *bonus*) comes from the target's distribution at that node.
4. **Compact** (`compact_cache`): keep the target's KV entries of the root and the accepted
   path, in order, and feed the target's real features of those tokens to the drafter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .drafter_state import DrafterState
from .kv_cache import check_compactable, compact_cache
from .stats import DecodingStats, TreeSizeChoice, TreeSizeRecord
from .tree_size import (
    ADAPT_EVERY_PASSES,
    choose_tree_size,
    measure_draft_level_cost,
    measure_verification_costs,
    observed_acceptance_slope,
    remember_slope,
    remembered_slope,
)
from .validation import check_custom_masks, check_dream_call

DEFAULT_TREE_TOP_K = 4
DEFAULT_TREE_DEPTH = 5
DEFAULT_TREE_TOTAL_TOKENS = 16


# ---------------------------------------------------------------------------------------------
# The draft tree
# ---------------------------------------------------------------------------------------------
@dataclass
class DraftTree:
    """A verified-in-one-pass token tree. Index 0 is the root (the last token of the sequence,
    not yet through the target); nodes `1..n` are drafted tokens, parents before children.

    Args:
        tokens: `(n + 1,)` token ids, root included.
        parents: parent index of every node (`-1` for the root).
        depths: `(n + 1,)` depth of every node (root 0).
        ranks: rank of every node among its siblings by draft score (0 = the drafter's top choice).
        ancestors: `(n + 1, n + 1)` bool, `ancestors[i, j]` is True when j is i or an ancestor of i.
    """

    tokens: torch.LongTensor
    parents: list[int]
    depths: torch.LongTensor
    ranks: list[int]
    ancestors: torch.BoolTensor
    children: list[list[int]] = field(default_factory=list)

    @classmethod
    def from_parents(cls, tokens: torch.LongTensor, parents: list[int], ranks: list[int] | None = None) -> DraftTree:
        """Build a tree from tokens (root first) and parent indices (every parent before its children)."""
        size = len(parents)
        if parents[0] != -1 or any(not 0 <= parents[i] < i for i in range(1, size)):
            raise ValueError(f"parents must start with -1 and point to earlier nodes, got {parents}")
        ancestors = torch.zeros(size, size, dtype=torch.bool, device=tokens.device)
        depths = [0] * size
        children: list[list[int]] = [[] for _ in range(size)]
        ancestors[0, 0] = True
        for node in range(1, size):
            parent = parents[node]
            ancestors[node] = ancestors[parent]
            ancestors[node, node] = True
            depths[node] = depths[parent] + 1
            children[parent].append(node)
        return cls(
            tokens=tokens,
            parents=list(parents),
            depths=torch.tensor(depths, device=tokens.device),
            ranks=list(ranks) if ranks is not None else [0] * size,
            ancestors=ancestors,
            children=children,
        )

    def __len__(self) -> int:
        return len(self.parents)

    def path_tokens(self, node: int) -> torch.LongTensor:
        """Tokens from the first drafted ancestor down to `node` (root excluded), in order."""
        path = self.ancestors[node].nonzero().squeeze(-1)[1:]  # indices ascend with depth
        return self.tokens[path]

    def child_with_token(self, node: int, token: int) -> int | None:
        """The child of `node` that drafted `token`, or None: where a greedy walk goes after the target picks `token`."""
        for child in self.children[node]:
            if int(self.tokens[child]) == token:
                return child
        return None


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
        self.depths: list[int] = []
        self.ranks: list[int] = []
        self.scores = torch.empty(0, device=device)
        self.states: dict[int, _NodeState] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def add_children(self, parents: list[int], depth: int, tokens: torch.Tensor, scores: torch.Tensor) -> list[int]:
        """Add `tokens[r, j]` as the j-th ranked child of `parents[r]`; drops impossible ones (-inf)."""
        new_ids, keep = [], torch.isfinite(scores)
        for row, parent in enumerate(parents):
            for rank, (token, ok) in enumerate(zip(tokens[row].tolist(), keep[row].tolist())):
                if not ok:
                    continue
                new_ids.append(len(self.tokens))
                self.tokens.append(token)
                self.parents.append(parent)
                self.depths.append(depth)
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
    """Runs a [`DreamDraftModel`] over the frontier of a draft tree.

    The verified state (the drafter's KV cache and its feature memory, both holding only tokens
    whose target features are known) lives in the [`DrafterState`] `state` and is never touched
    here; every tree node's speculative state is kept aside in the candidate pool, so nothing has
    to be cropped after verification.
    """

    def __init__(self, state: DrafterState, logits_processor, eos_token_ids):
        self.state = state
        self.drafter = state.drafter
        self.adapter = state.adapter
        self.logits_processor = logits_processor
        self.eos_token_ids = eos_token_ids

    def draft(self, input_ids, root_output, top_k: int, depth: int, total: int) -> DraftTree:
        """Draft one tree below the last token of `input_ids`.

        Args:
            input_ids: `(1, T)` the sequence so far; its last token is the root.
            root_output: the drafter's output whose last position is the root (its features and
                logits were computed with the target's real features only).
        """
        pool = _CandidatePool(input_ids.device)
        root = self._node_states(root_output.features[:, -1], [[]])[0]
        log_probs = self._log_probs(input_ids, root_output.logits[:, -1])
        tokens, scores = top_children(log_probs, torch.zeros(1, device=input_ids.device), top_k)
        new_ids = pool.add_children([-1], 1, tokens, scores)
        for level in range(1, depth):
            frontier = select_frontier(pool.scores, pool.tokens, new_ids, top_k, self.eos_token_ids)
            if not frontier:
                break
            output, layer_kv = self._forward_frontier(input_ids, pool, root, frontier, level)
            row_kv = [[(keys[row], values[row]) for keys, values in layer_kv] for row in range(len(frontier))]
            pool.states.update(zip(frontier, self._node_states(output.features[:, -1], row_kv)))
            prefixes = torch.cat([input_ids.expand(len(frontier), -1), self._path_tokens(pool, frontier)], dim=1)
            log_probs = self._log_probs(prefixes, output.logits[:, -1])
            tokens, scores = top_children(log_probs, pool.scores[frontier], top_k)
            new_ids = pool.add_children(frontier, level + 1, tokens, scores)
        return self._to_tree(input_ids, pool, total)

    # --- helpers ---------------------------------------------------------------------------
    def _log_probs(self, prefixes, logits):
        """Draft log-probabilities after the target's logits processors, each row with its own prefix."""
        return self.logits_processor(prefixes, logits.float()).log_softmax(dim=-1)

    def _node_states(self, features, layer_kv: list[list]) -> list[_NodeState]:
        """Node states of a batch of rows: features `(rows, hidden)`, per-row drafter KV; the
        cross-attention projections are computed once here, as the linear memory does on append."""
        features = features.to(self.drafter.dtype)
        keys = values = [None] * len(features)
        if self.drafter.cross_block is not None:
            keys, values = self.drafter.cross_block.cross_attn.project_memory(features[:, None])
        return [
            _NodeState(features[row : row + 1], keys[row], values[row], layer_kv[row]) for row in range(len(features))
        ]

    @staticmethod
    def _path_tokens(pool: _CandidatePool, nodes: list[int]) -> torch.LongTensor:
        paths = [[pool.tokens[i] for i in pool.path(node)] for node in nodes]
        return torch.tensor(paths, dtype=torch.long, device=pool.device)

    def _forward_frontier(self, input_ids, pool, root: _NodeState, frontier: list[int], level: int):
        """One batched drafter forward: row r is frontier node r at depth `level`."""
        rows = len(frontier)
        ancestors = [pool.path(node)[:-1] for node in frontier]  # depths 1 .. level-1
        memory = self._memory_rows(rows, root, [[pool.states[a] for a in path] for path in ancestors])
        cache = self._cache_rows(rows, [[pool.states[a] for a in path] for path in ancestors])
        tokens = torch.tensor([[pool.tokens[node]] for node in frontier], device=input_ids.device)
        position = int(self.state.lengths[0]) - 1 + level
        positions = torch.full((rows, 1), position, dtype=torch.long, device=input_ids.device)
        output = self.drafter(self.adapter.embed(tokens), positions, memory=memory, cache=cache)
        layer_kv = [(layer.keys[:, :, -1:], layer.values[:, :, -1:]) for layer in cache.layers]
        return output, layer_kv

    def _memory_rows(self, rows: int, root: _NodeState, paths: list[list[_NodeState]]):
        """Verified features + the root's and each row's ancestors' draft features (position order)."""
        base = self.state.memory.fork(torch.zeros(1, dtype=torch.long), int(self.state.lengths[0]) - 1)
        lineages = [[root] + path for path in paths]
        features = torch.cat([base.features.expand(rows, -1, -1), _stack(lineages, lambda n: n.feature, 0)], dim=1)
        keys = values = None
        if base.keys is not None:
            keys = torch.cat([base.keys.expand(rows, -1, -1, -1), _stack(lineages, lambda n: n.memory_key, 1)], dim=2)
            values = torch.cat([base.values.expand(rows, -1, -1, -1), _stack(lineages, lambda n: n.memory_value, 1)], dim=2)
        return type(base)(self.drafter, features, keys, values)

    def _cache_rows(self, rows: int, paths: list[list[_NodeState]]) -> DynamicCache:
        """A fresh drafter cache whose row r is the verified cache followed by row r's ancestors.
        (The verified part is copied once per level: the drafter's layers take no tree mask.)"""
        cache = DynamicCache()
        for index, layer in enumerate(self.state.cache.cache.layers):
            keys, values = layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1)
            if paths[0]:  # every row has the same number of ancestors (one level at a time)
                keys = torch.cat([keys, _stack(paths, lambda n, i=index: n.layer_kv[i][0], 1)], dim=2)
                values = torch.cat([values, _stack(paths, lambda n, i=index: n.layer_kv[i][1], 1)], dim=2)
            cache.update(keys, values, index)
        return cache

    @staticmethod
    def _to_tree(input_ids, pool: _CandidatePool, total: int) -> DraftTree:
        chosen = select_tree_nodes(pool.scores, pool.parents, total) if len(pool) else []
        index = {node: i + 1 for i, node in enumerate(chosen)}
        parents = [-1] + [index.get(pool.parents[node], 0) for node in chosen]
        tokens = torch.tensor([int(input_ids[0, -1])] + [pool.tokens[node] for node in chosen], device=input_ids.device)
        return DraftTree.from_parents(tokens, parents, [0] + [pool.ranks[node] for node in chosen])


# ---------------------------------------------------------------------------------------------
# Target verification
# ---------------------------------------------------------------------------------------------
def layer_tree_mask(layer, tree: DraftTree, visible: torch.BoolTensor | None, dtype) -> torch.Tensor:
    """Additive `(1, 1, n, kv_length)` mask for one cache layer: every tree token sees the cached
    past (minus padding, and within the window of sliding layers) plus its ancestors and itself.

    `layer.get_mask_sizes` gives the key span the layer's attention will receive after appending
    the tree (sliding layers only return their window), so the mask matches it exactly.
    """
    size = len(tree)
    device = tree.ancestors.device
    past = layer.get_seq_length()
    kv_length, kv_offset = layer.get_mask_sizes(size)
    slots = torch.arange(kv_offset, kv_offset + kv_length, device=device)  # absolute cache slots
    in_tree = slots >= past
    tree_column = (slots - past).clamp(min=0)
    allowed = torch.where(in_tree[None, :], tree.ancestors[:, tree_column], ~in_tree[None, :])
    if visible is not None and past > 0:
        allowed &= in_tree[None, :] | visible.to(device)[slots.clamp(max=past - 1)][None, :]
    if getattr(layer, "is_sliding", False):
        query_slot = past + tree.depths
        key_slot = torch.where(in_tree, past + tree.depths[tree_column], slots)
        allowed &= (query_slot[:, None] - key_slot[None, :]) < layer.sliding_window
    mask = torch.zeros(1, 1, size, kv_length, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def tree_attention_mask(model, cache, tree: DraftTree, visible: torch.BoolTensor | None = None):
    """The 4-D mask(s) for the target's tree pass.

    A single tensor for models with one attention type (transformers returns a 4-D mask as-is
    from its mask builders); a dict keyed by layer type for models that mix full and sliding
    layers (Gemma3 reads `attention_mask[layer_type]` when given a dict).
    """
    layer_types = getattr(model.config.get_text_config(), "layer_types", None)
    dtype = model.dtype
    if layer_types and len(set(layer_types)) > 1:
        masks = {}
        for index, layer_type in enumerate(layer_types):
            if layer_type not in masks:
                masks[layer_type] = layer_tree_mask(cache.layers[index], tree, visible, dtype)
        return masks
    return layer_tree_mask(cache.layers[0], tree, visible, dtype)


@dataclass
class TreeVerification:
    """The target's outputs at every tree node: `logits (n + 1, vocab)` (float32) and last-layer
    (post-norm) `features (1, n + 1, hidden)`."""

    logits: torch.Tensor
    features: torch.Tensor


def verify_tree(model, cache, tree: DraftTree, root_position: int, last_layer: int, visible=None) -> TreeVerification:
    """Run the root and every drafted node through the target in one forward.

    Positions are `root_position + depth`: siblings share a position, exactly as they would in
    the sequence if accepted. The cache grows by `len(tree)` entries; call [`compact_cache`] next.
    """
    mask = tree_attention_mask(model, cache, tree, visible)
    positions = (root_position + tree.depths)[None]
    outputs = model(
        input_ids=tree.tokens[None],
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        output_hidden_states=[last_layer],
        return_dict=True,
    )
    return TreeVerification(logits=outputs.logits[0].float(), features=outputs.hidden_states[last_layer])


# ---------------------------------------------------------------------------------------------
# Acceptance
# ---------------------------------------------------------------------------------------------
@dataclass
class TreeAcceptance:
    """Result of walking a verified tree: accepted node indices (root excluded, in order), the
    token after them (`None` when the walk stopped on an accepted EOS) and the processed target
    scores of every node visited (one per new token)."""

    path: list[int]
    bonus: int | None
    scores: list[torch.Tensor]


def greedy_walk(tree: DraftTree, node_scores, eos_token_ids=None) -> TreeAcceptance:
    """Follow the children that equal the target's argmax, starting at the root."""
    node, path, visited = 0, [], []
    while True:
        scores = node_scores(node)
        visited.append(scores)
        token = int(scores.argmax(dim=-1))
        child = tree.child_with_token(node, token)
        if child is None:
            return TreeAcceptance(path, token, visited)
        path.append(child)
        if eos_token_ids is not None and token in eos_token_ids:
            return TreeAcceptance(path, None, visited)
        node = child


def residual_after_rejection(probs: torch.Tensor, token: int) -> torch.Tensor:
    """The target distribution conditioned on not being `token` (the residual max(p - q, 0) of a
    point-mass proposal q at `token`, renormalised)."""
    residual = probs.clone()
    residual[token] = 0.0
    total = residual.sum()
    return residual / total if total > 0 else residual


def try_candidate(probs: torch.Tensor, token: int) -> tuple[bool, torch.Tensor]:
    """Speculative sampling with a point-mass proposal: accept `token` with probability
    `probs[token]`; on rejection return the residual the next candidate is tried against."""
    if torch.rand((), device=probs.device) < probs[token]:
        return True, probs
    return False, residual_after_rejection(probs, token)


def sampling_walk(tree: DraftTree, node_scores, eos_token_ids=None) -> TreeAcceptance:
    """Lossless multi-candidate speculative sampling down the tree.

    At each node the children are tried in draft order against the target's (processed)
    distribution, each rejection conditioning that distribution on "not this token"; if all
    are rejected the bonus token is drawn from what is left. Every step samples exactly from the
    target's distribution whatever the children are, so the output is too.
    """
    node, path, visited = 0, [], []
    while True:
        scores = node_scores(node)
        visited.append(scores)
        probs = scores[0].softmax(dim=-1)
        accepted = None
        for child in tree.children[node]:
            ok, probs = try_candidate(probs, int(tree.tokens[child]))
            if ok:
                accepted = child
                break
        if accepted is None:
            return TreeAcceptance(path, int(torch.multinomial(probs, 1)), visited)
        path.append(accepted)
        if eos_token_ids is not None and int(tree.tokens[accepted]) in eos_token_ids:
            return TreeAcceptance(path, None, visited)
        node = accepted


def node_scores_fn(tree: DraftTree, verification: TreeVerification, input_ids, logits_processor):
    """Processed target scores of one node, computed lazily (only visited nodes pay for the
    processors), each with that node's own prefix: the sequence plus its path."""

    def node_scores(node: int) -> torch.Tensor:
        prefix = torch.cat([input_ids, tree.path_tokens(node)[None].to(input_ids.device)], dim=1)
        return logits_processor(prefix, verification.logits[node : node + 1].to(input_ids.device))

    return node_scores


def cut_new_tokens(tokens: list[int], budget: int, eos_token_ids) -> list[int]:
    """As transformers' assisted loop: never past max_length, and nothing after the first EOS."""
    tokens = tokens[:budget]
    if eos_token_ids is not None:
        for index, token in enumerate(tokens):
            if token in eos_token_ids:
                return tokens[: index + 1]
    return tokens


# ---------------------------------------------------------------------------------------------
# generate()
# ---------------------------------------------------------------------------------------------
def _validate(model, input_ids, generation_config, drafter, top_k, depth, total) -> None:
    check_dream_call(model, drafter, generation_config, usage="`target.generate(..., custom_generate=tree_generate, drafter=drafter)`")
    if input_ids.shape[0] != 1:
        raise ValueError(f"DREAM tree decoding supports batch size 1 for now, got {input_ids.shape[0]}.")
    if total == "auto":
        total = 1
    for name, value in (("tree_top_k", top_k), ("tree_depth", depth), ("tree_total_tokens", total)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be >= 1, got {value}.")
    check_custom_masks(model, "Tree verification passes a custom 4-D attention mask")


def _prefill(model, input_ids, model_kwargs, hidden_layers):
    cache = model_kwargs.get("cache")
    if cache is None or cache.get_seq_length() > 0:
        raise ValueError("DREAM tree decoding starts from an empty cache (no cache continuation).")
    inputs = model.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **model_kwargs)
    inputs["output_hidden_states"] = hidden_layers
    return model(**inputs, return_dict=True)


def _pick(scores: torch.Tensor, do_sample: bool) -> int:
    if do_sample:
        return int(torch.multinomial(scores[0].softmax(dim=-1), 1))
    return int(scores[0].argmax(dim=-1))


def tree_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    drafter=None,
    tree_top_k: int = DEFAULT_TREE_TOP_K,
    tree_depth: int = DEFAULT_TREE_DEPTH,
    tree_total_tokens: int = DEFAULT_TREE_TOTAL_TOKENS,
    tree_streamer=None,
    **model_kwargs,
):
    """DREAM decoding with EAGLE-2-style dynamic trees, for `generate(custom_generate=...)`.

    Call it as `target.generate(**inputs, custom_generate=tree_generate, drafter=drafter, ...)`;
    transformers prepares inputs, images (`mm_encoder_outputs`), the cache, logits processors and
    stopping criteria, then hands them here.

    Args:
        drafter (`DreamDraftModel`): the drafter (transformers drops `assistant_model` on this path).
        tree_top_k (`int`): children expanded per node, and frontier nodes expanded per level.
        tree_depth (`int`): longest drafted path (tokens after the last one).
        tree_total_tokens (`int` or `"auto"`): drafted nodes verified per target pass (the root comes
            on top). `"auto"` times target passes over 1..64 new tokens and a drafter step on this
            machine once (cached) and picks the size, depth and top-k with the best expected
            tokens per second (see `hf_dream.generation.tree_size`), then picks again every few
            passes from the acceptance observed so far (remembered for the next call with the same
            target and drafter); the choices are in
            `drafter.last_stats["tree_size"]` (`history`: each size and the slope that chose it).
        tree_streamer: where the streamer arrives: transformers 5.24 does not pass `streamer` to a
            `custom_generate` callable, so `import hf_dream` makes `generate(streamer=...)` forward
            it here (it gets the prompt, every accepted token and `end()`).

    Returns:
        The sequences (`LongTensor`), or a `GenerateDecoderOnlyOutput` (`sequences`, plus
        `scores` / `logits` of the new tokens when asked) with `return_dict_in_generate=True`.
        Decoding statistics are in `drafter.last_stats` (as for chain drafting, plus
        `side_branch_tokens`: accepted tokens that were not their parent's top draft).
    """
    _validate(model, input_ids, generation_config, drafter, tree_top_k, tree_depth, tree_total_tokens)
    # generate() may leave CPU inputs on the CPU; every tree tensor is built next to the target
    input_ids = input_ids.to(model.get_input_embeddings().weight.device)
    if tree_streamer is not None:
        streamer = tree_streamer
        streamer.put(input_ids.cpu())
    eos = getattr(generation_config, "_eos_token_tensor", None)
    eos_token_ids = None if eos is None else set(eos.reshape(-1).tolist())
    do_sample = bool(generation_config.do_sample)
    want_scores = generation_config.return_dict_in_generate and generation_config.output_scores
    want_logits = generation_config.return_dict_in_generate and generation_config.output_logits
    scores_out, logits_out = [], []

    # The chain generator owns the drafter's verified state (cache, feature memory, visual-token
    # compression at prefill) and the statistics; the tree code only adds speculative nodes.
    state = DrafterState(model, drafter, 1, input_ids.device, track_rows=False)
    stats = DecodingStats.new(1, tree=True)
    last_layer = state.adapter.num_hidden_layers
    prompt_length = input_ids.shape[1]
    position_ids = model_kwargs.get("position_ids")
    position_offset = 0 if position_ids is None else int(position_ids[0, -1]) + 1 - prompt_length
    mask_2d = model_kwargs.get("attention_mask")
    visible = None if mask_2d is None else mask_2d[0].bool()

    # --- prefill: a plain target step that also gives the drafter the prompt's features ------
    state.start_prefill(input_ids)
    outputs = _prefill(model, input_ids, model_kwargs, [0, last_layer])
    cache = outputs.cache if getattr(outputs, "cache", None) is not None else model_kwargs["cache"]
    check_compactable(cache)
    cache.activate_past_recording()  # sliding layers must not evict entries during a tree pass
    raw = outputs.logits[:, -1].float()
    scores = logits_processor(input_ids, raw)
    token = _pick(scores, do_sample)
    scores_out.append(scores)
    logits_out.append(raw)
    input_ids = torch.cat([input_ids, input_ids.new_tensor([[token]])], dim=1)
    visible = None if visible is None else torch.cat([visible, visible.new_ones(1)])
    stats.record_pass(None)
    stats.record_acceptance([0], [1])
    if streamer is not None:
        streamer.put(input_ids[:, -1:].cpu())
    finished = bool(stopping_criteria(input_ids, scores).all())
    if not finished:
        prompt_mask = torch.ones_like(input_ids[:, :prompt_length], dtype=torch.bool) if visible is None else visible[None, :prompt_length]
        hidden = outputs.hidden_states
        root_output = state.prefill(input_ids[:, :prompt_length], prompt_mask, hidden[0], hidden[last_layer], input_ids[:, -1])
        stats.record_visual(state)
    del outputs

    adaptive = tree_total_tokens == "auto" and not finished
    if adaptive:
        costs = measure_verification_costs(model, input_ids.shape[1])
        level_cost = measure_draft_level_cost(state)
        slope = remembered_slope(model, drafter)
        size = choose_tree_size(costs, level_cost, slope)
        tree_top_k, tree_depth, tree_total_tokens = size.top_k, size.depth, size.total_tokens
        stats.tree_size = TreeSizeRecord(size.top_k, size.depth, size.total_tokens, costs, [TreeSizeChoice(size.total_tokens, slope)])
        window_passes = window_tokens = 0
    tree_drafter = TreeDrafter(state, logits_processor, eos_token_ids)
    while not finished:
        length = input_ids.shape[1]
        depth = min(tree_depth, generation_config.max_length - length - 1)  # the pass adds a bonus token itself
        if depth > 0:
            tree = tree_drafter.draft(input_ids, root_output, tree_top_k, depth, tree_total_tokens)
        else:
            tree = DraftTree.from_parents(input_ids[0, -1:], [-1])
        root_position = length - 1 + position_offset
        verification = verify_tree(model, cache, tree, root_position, last_layer, visible)
        node_scores = node_scores_fn(tree, verification, input_ids, logits_processor)
        walk = (sampling_walk if do_sample else greedy_walk)(tree, node_scores, eos_token_ids)

        proposed = [int(tree.tokens[node]) for node in walk.path] + ([] if walk.bonus is None else [walk.bonus])
        new_tokens = cut_new_tokens(proposed, generation_config.max_length - length, eos_token_ids)
        accepted = len(new_tokens) - 1
        keep = torch.tensor([0] + walk.path[:accepted], device=input_ids.device)
        compact_cache(cache, len(tree), keep)

        step_scores = walk.scores[: len(new_tokens)]
        scores_out.extend(step_scores)
        logits_out.extend(verification.logits[[0] + walk.path][: len(new_tokens), None].unbind(0))
        input_ids = torch.cat([input_ids, input_ids.new_tensor([new_tokens])], dim=1)
        if visible is not None:
            visible = torch.cat([visible, visible.new_ones(len(new_tokens))])
        side = sum(1 for node in walk.path[:accepted] if tree.ranks[node] > 0)
        stats.record_pass([len(tree) - 1])
        stats.record_acceptance([accepted], [len(new_tokens)], side=[side])
        if adaptive and depth > 0:
            # re-size the tree from the acceptance this drafter really achieves on this prompt
            window_passes, window_tokens = window_passes + 1, window_tokens + len(new_tokens)
            if window_passes == ADAPT_EVERY_PASSES:
                # half the new window, half the history: two passes alone are a noisy estimate
                slope = 0.5 * slope + 0.5 * observed_acceptance_slope(window_tokens / window_passes, tree_total_tokens)
                remember_slope(model, drafter, slope)
                size = choose_tree_size(costs, level_cost, slope)
                tree_top_k, tree_depth, tree_total_tokens = size.top_k, size.depth, size.total_tokens
                record = stats.tree_size
                record.top_k, record.depth, record.total_tokens = size.top_k, size.depth, size.total_tokens
                record.history.append(TreeSizeChoice(size.total_tokens, slope))
                window_passes = window_tokens = 0
        if streamer is not None:
            streamer.put(input_ids.new_tensor([new_tokens]).cpu())
        finished = bool(stopping_criteria(input_ids, tuple(scores_out)).all())
        if not finished:
            # The drafter catches up with the target's real features of the root and the
            # accepted nodes, then runs over the accepted tokens and the bonus token.
            features = verification.features[:, keep.to(verification.features.device)]
            root_output = state.catch_up([new_tokens], features)

    stats.publish(drafter)
    if streamer is not None:
        streamer.end()
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(
            sequences=input_ids,
            scores=tuple(scores_out) if want_scores else None,
            logits=tuple(logits_out) if want_logits else None,
            cache=cache,
        )
    return input_ids
