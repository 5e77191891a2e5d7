"""The target side of DREAM's custom decoding loops: one engine for trees, batches and trees in
batches (a chain is a width-1 tree, a batch a set of per-row trees).

One round, for every unfinished row at once:
1. **Draft** (the drafter side, [`DrafterState`]): a chain of up to `k` tokens per row, or a
   dynamic tree per row ([`TreeDrafter`]).
2. **Verify** (`verify`): one target forward over every row's root (its last token) and drafted
   nodes, with explicit per-row positions (`root + depth`) and a mask that shows each node the
   row's real cache entries, its ancestors and itself: 2-D when every row drafted a chain, 4-D
   for trees (per layer type, following sliding windows).
3. **Accept** (`accept`): walk down each row's tree. Greedy: follow the child equal to the
   target's argmax. Sampling: try the children in draft order against the target distribution
   p, each with its proposal q (the drafter's distribution for a sampled chain draft, a point
   mass for a tree child): accept with probability min(1, p(t) / q(t)), else continue with the
   residual max(p - q, 0), normalised. Every new token is then distributed exactly as under p
   (Leviathan et al., SpecInfer); the token after the last accepted node comes from what is left.
4. **Bookkeeping**: one stopping rule per row on transformers' `StoppingCriteriaList`
   ([`RowStopper`]); the target cache keeps the root and the accepted path of every row
   ([`RaggedCache`]: rejected entries become holes, compacted when needed and always on targets
   with sliding windows); rows that finish leave both caches; the drafter catches up with the
   target's features of the kept tokens; statistics go to one [`DecodingStats`] record, and one
   output builder lays rows out as plain generate does.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.generation import logits_process as lp
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..targets import position_ids_for_model
from .cost_model import TreeSize, TreeSizer
from .drafter_state import DrafterState
from .kv_cache import RaggedCache, check_compactable
from .stats import DecodingStats
from .validation import check_custom_loop_outputs, check_dream_inputs

# Processors whose output for a row depends on that row's scores only, never on its prefix or
# its length: they can run once over every (row, node) of a round.
ROW_WISE_PROCESSORS = (
    lp.TemperatureLogitsWarper, lp.TopKLogitsWarper, lp.TopPLogitsWarper, lp.MinPLogitsWarper, lp.TypicalLogitsWarper,
    lp.EpsilonLogitsWarper, lp.EtaLogitsWarper, lp.SuppressTokensLogitsProcessor, lp.InfNanRemoveLogitsProcessor,
    lp.LogitNormalization,
)


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
        proposals: `(n + 1, vocab)` processed draft scores each node was *sampled* from (row 0
            unused), or None when the nodes were chosen deterministically (point-mass proposals).
    """

    tokens: torch.LongTensor
    parents: list[int]
    depths: torch.LongTensor
    ranks: list[int]
    ancestors: torch.BoolTensor
    children: list[list[int]] = field(default_factory=list)
    proposals: torch.Tensor | None = None

    @classmethod
    def from_parents(cls, tokens: torch.LongTensor, parents: list[int], ranks: list[int] | None = None, proposals=None) -> DraftTree:
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
        ranks = list(ranks) if ranks is not None else [0] * size
        return cls(tokens, list(parents), torch.tensor(depths, device=tokens.device), ranks, ancestors, children, proposals)

    @classmethod
    def chain(cls, root: int, drafts: torch.LongTensor, proposals: torch.Tensor | None = None) -> DraftTree:
        """A chain: node i's parent is node i - 1; `proposals (k, vocab)`: the scores drafts were sampled from."""
        tokens = torch.cat([drafts.new_tensor([root]), drafts])
        if proposals is not None:
            proposals = torch.cat([proposals[:1], proposals])  # row 0 (the root) is never read
        return cls.from_parents(tokens, list(range(-1, len(drafts))), proposals=proposals)

    def __len__(self) -> int:
        return len(self.parents)

    @property
    def is_chain(self) -> bool:
        return all(parent == node - 1 for node, parent in enumerate(self.parents))

    def path_tokens(self, node: int) -> torch.LongTensor:
        """Tokens from the first drafted ancestor down to `node` (root excluded), in order."""
        return self.tokens[self.ancestors[node].nonzero().squeeze(-1)[1:]]  # indices ascend with depth

    def child_with_token(self, node: int, token: int) -> int | None:
        """The child of `node` that drafted `token`, or None: where a greedy walk goes after the target picks `token`."""
        for child in self.children[node]:
            if int(self.tokens[child]) == token:
                return child
        return None


# ---------------------------------------------------------------------------------------------
# Logits processors and stopping, per row
# ---------------------------------------------------------------------------------------------
def process_rows(logits_processor, scores: torch.Tensor, prefixes, rows: list[int], batch_size: int) -> torch.Tensor:
    """Apply `logits_processor` to `scores (n, vocab)`, score row i as batch row `rows[i]` with its
    own prefix.

    `prefixes` is a list of 1-D token tensors (score row i's sequence so far, exactly as plain
    generate would show it to the processors: padded prompt plus tokens) or a callable returning
    that list, called only when a processor reads prefixes. Some processors keep per-batch-row
    state (e.g. the repetition penalty's per-row prompt padding), so such processors are always
    called with the full batch in its original order: once per group of score rows of one
    prefix length and distinct batch rows, in their batch rows, placeholders (discarded) elsewhere.
    """
    if not logits_processor:
        return scores
    if all(isinstance(processor, ROW_WISE_PROCESSORS) for processor in logits_processor):
        placeholder = torch.zeros(scores.shape[0], 1, dtype=torch.long, device=scores.device)
        return logits_processor(placeholder, scores)
    prefixes = prefixes() if callable(prefixes) else prefixes
    groups: dict[int, list[list[int]]] = defaultdict(list)
    for index, prefix in enumerate(prefixes):
        same_length = groups[len(prefix)]
        group = next((g for g in same_length if all(rows[i] != rows[index] for i in g)), None)
        if group is None:
            same_length.append(group := [])
        group.append(index)
    processed = torch.empty_like(scores)
    for length, members_list in groups.items():
        for members in members_list:
            batch_rows = [rows[i] for i in members]
            ids = torch.zeros(batch_size, length, dtype=torch.long)
            full_scores = scores.new_zeros(batch_size, scores.shape[-1])
            for i, row in zip(members, batch_rows):
                ids[row] = prefixes[i]
                full_scores[row] = scores[i]
            out = logits_processor(ids.to(scores.device), full_scores)
            processed[torch.tensor(members, device=scores.device)] = out[torch.tensor(batch_rows, device=scores.device)]
    return processed


class TargetScores:
    """The target's processed scores `(1, vocab)` of node `node` of row `i`'s tree, each with its
    own prefix (the row's sequence plus the node's path). Row-wise processors run once over every
    node; others run lazily on visited nodes only in a batch of one, and over every node in a
    batch (processors with per-batch-row state must see the whole batch)."""

    def __init__(self, logits_processor, logits: torch.Tensor, trees: list[DraftTree], sequences, rows: list[int], batch_size: int):
        self.logits_processor, self.logits, self.trees, self.sequences = logits_processor, logits, trees, sequences
        self.computed: dict[tuple[int, int], torch.Tensor] = {}
        row_wise = not logits_processor or all(isinstance(p, ROW_WISE_PROCESSORS) for p in logits_processor)
        if row_wise or batch_size > 1:
            pairs = [(i, node) for i, tree in enumerate(trees) for node in range(len(tree))]
            flat = torch.stack([logits[i, node] for i, node in pairs])
            prefixes = lambda: [self.prefix(i, node) for i, node in pairs]  # noqa: E731
            processed = process_rows(logits_processor, flat, prefixes, [rows[i] for i, _ in pairs], batch_size)
            self.computed = {pair: processed[j : j + 1] for j, pair in enumerate(pairs)}

    def prefix(self, i: int, node: int) -> torch.Tensor:
        """What plain generate would show the processors at this node: the row's sequence plus the node's path."""
        return torch.cat([self.sequences(i), self.trees[i].path_tokens(node).cpu()])

    def __call__(self, i: int, node: int) -> torch.Tensor:
        if (i, node) not in self.computed:
            prefix = self.prefix(i, node)[None].to(self.logits.device)
            self.computed[i, node] = self.logits_processor(prefix, self.logits[i, node : node + 1])
        return self.computed[i, node]


class RowStopper:
    """Per-row stopping: EOS and the length budget natively (vectorisable, no prefix needed),
    every other stopping criterion (stop strings, max time, user criteria) called on the row's
    own sequence after each new token, as plain generate would call it for that row."""

    def __init__(self, stopping_criteria, generation_config, prompt_width: int):
        eos = getattr(generation_config, "_eos_token_tensor", None)
        eos_ids = set() if eos is None else set(eos.reshape(-1).tolist())
        max_length = generation_config.max_length
        others = []
        for criterion in stopping_criteria or []:
            if isinstance(criterion, EosTokenCriteria):
                eos_ids |= set(criterion.eos_token_id.reshape(-1).tolist())
            elif isinstance(criterion, MaxLengthCriteria):
                max_length = min(max_length, criterion.max_length)
            else:
                others.append(criterion)
        self.eos_ids = eos_ids
        self.eos_tensor = torch.tensor(sorted(eos_ids), dtype=torch.long) if eos_ids else None
        self.max_new_tokens = max_length - prompt_width
        self.others = StoppingCriteriaList(others) if others else None

    def is_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        """Boolean mask of `tokens` (any shape) that are EOS ids; all False when there are none."""
        if self.eos_tensor is None:
            return torch.zeros_like(tokens, dtype=torch.bool)
        return torch.isin(tokens, self.eos_tensor.to(tokens.device))

    def fires(self, sequence: torch.Tensor, new_tokens: list[int]) -> torch.Tensor:
        """`(1,)` bool: whether a criterion other than EOS and length fires right after `new_tokens`
        follow `sequence` (1-D), with no scores (drafted tokens have no target scores yet)."""
        if self.others is None or not new_tokens:
            return torch.zeros(1, dtype=torch.bool, device=sequence.device)
        prefix = torch.cat([sequence, sequence.new_tensor(new_tokens)])
        return self.others(prefix[None], None).reshape(-1)[:1].to(sequence.device)

    def cut(self, sequence, new_tokens: list[int], scores, generated: int) -> tuple[int, bool]:
        """How many of `new_tokens` a row that has `generated` tokens keeps, and whether it is
        finished then. `sequence()` gives what they follow (the row's padded prompt plus its
        tokens; only called for criteria that read it); `scores(j)` the processed scores
        `(1, vocab)` of new token j."""
        new_tokens = new_tokens[: self.max_new_tokens - generated]
        for index, token in enumerate(new_tokens):
            if token in self.eos_ids:
                return index + 1, True
            if self.others is not None:
                before = sequence()
                prefix = torch.cat([before, before.new_tensor(new_tokens[: index + 1])])
                if bool(self.others(prefix[None], scores(index)).any()):
                    return index + 1, True
        return len(new_tokens), generated + len(new_tokens) >= self.max_new_tokens


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------
@dataclass
class Verification:
    """The target's outputs at every node of every row's tree (padded to the largest tree):
    `logits (rows, n, vocab)` (float32) and the drafter's `features (rows, n, hidden)`: the target's last layer
    (post-norm), or the drafter's fusion of its `feature_layers`."""

    logits: torch.Tensor
    features: torch.Tensor


def layer_tree_mask(layer, ancestors, depths, visible: torch.BoolTensor | None, dtype) -> torch.Tensor:
    """Additive `(rows, 1, n, kv_length)` mask for one cache layer: every tree node sees the row's
    real cached entries (`visible (rows, past)`; within the window on sliding layers), its ancestors
    (`ancestors (rows, n, n)`) and itself.

    `layer.get_mask_sizes` gives the key span the layer's attention will receive after appending
    the tree (sliding layers only return their window), so the mask matches it exactly."""
    rows, size = depths.shape
    device = ancestors.device
    past = layer.get_seq_length()
    kv_length, kv_offset = layer.get_mask_sizes(size)
    slots = torch.arange(kv_offset, kv_offset + kv_length, device=device)  # absolute cache slots
    in_tree = slots >= past
    tree_column = (slots - past).clamp(min=0)
    allowed = torch.where(in_tree[None, None, :], ancestors[:, :, tree_column], ~in_tree[None, None, :])
    if visible is not None and past > 0:
        allowed &= in_tree[None, None, :] | visible.to(device)[:, slots.clamp(max=past - 1)][:, None, :]
    if getattr(layer, "is_sliding", False):
        query_slot = past + depths
        key_slot = torch.where(in_tree[None, :], past + depths[:, tree_column], slots[None, :])
        allowed &= (query_slot[:, :, None] - key_slot[:, None, :]) < layer.sliding_window
    mask = torch.zeros(rows, 1, size, kv_length, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def tree_depths(trees: list[DraftTree]) -> torch.LongTensor:
    """`(rows, n)` depth of every node of every row's tree, padded to the largest tree (padding: depth 0;
    after a chain, the column index: padding after a chain is causally invisible to it)."""
    size = max(len(tree) for tree in trees)
    if all(tree.is_chain for tree in trees):
        return torch.arange(size).expand(len(trees), -1)
    return torch.stack([torch.cat([t.depths.cpu(), t.depths.new_zeros(size - len(t)).cpu()]) for t in trees])


def verify(
    model, cache: RaggedCache, trees: list[DraftTree], depths: torch.LongTensor, positions: torch.LongTensor,
    feature_layers: list[int], fuse=None,
) -> Verification:
    """Run every row's root and drafted nodes through the target in one forward.

    `depths (rows, n)` are the nodes' depths as [`tree_depths`] lays them out (built once by the
    caller, which also places the nodes with them) and `positions (axes, rows, n)` the target's
    positions of the nodes: the root's position plus the node's depth on every axis
    ([`DrafterState.verify_positions`]), so siblings share a position, exactly as they would in the
    sequence if accepted. Smaller trees are padded with nodes that see only themselves. The
    cache grows by the padded size in every row; record which entries are kept with
    `cache.extend(...)` next. `feature_layers`: the target layers whose hidden states the forward returns;
    the features are `fuse(hidden_states)` (the drafter's `fuse_target_features`), or without `fuse` the one
    layer in `feature_layers`."""
    if fuse is None and len(feature_layers) != 1:
        raise ValueError(f"verify without `fuse` reads one feature layer, got {feature_layers}")
    size = max(len(tree) for tree in trees)
    device = positions.device
    tokens = torch.stack([torch.cat([t.tokens, t.tokens[:1].expand(size - len(t))]) for t in trees]).to(device)
    if all(tree.is_chain for tree in trees):  # padding after a chain is causal-invisible to it: a 2-D mask does
        mask = cache.attention_mask(size)
    else:
        depths = depths.to(device)
        ancestors = torch.eye(size, dtype=torch.bool, device=device).repeat(len(trees), 1, 1)
        for row, tree in enumerate(trees):
            ancestors[row, : len(tree), : len(tree)] = tree.ancestors.to(device)
        mask = tree_attention_mask(model, cache, ancestors, depths)
    outputs = model(
        input_ids=tokens,
        attention_mask=mask,
        position_ids=position_ids_for_model(positions),
        cache=cache.cache,
        use_cache=True,
        output_hidden_states=list(feature_layers),
        return_dict=True,
    )
    # the drafter's feature of each node: one target layer, or the drafter's fusion of several (`fuse(hidden_states)`)
    features = outputs.hidden_states[feature_layers[0]] if fuse is None else fuse(outputs.hidden_states)
    return Verification(logits=outputs.logits.float(), features=features)


def tree_attention_mask(model, cache: RaggedCache, ancestors, depths):
    """The 4-D mask(s) of a tree pass: one tensor for models with one attention type (transformers
    passes a 4-D mask through as-is), a dict keyed by layer type for models that mix full and
    sliding layers (Gemma3 reads `attention_mask[layer_type]` when given a dict)."""
    layer_types = getattr(model.config.get_text_config(), "layer_types", None)
    visible = None if bool(cache.valid.all()) else cache.valid
    if layer_types and len(set(layer_types)) > 1:
        first: dict[str, int] = {}
        for index, kind in enumerate(layer_types):
            first.setdefault(kind, index)
        return {kind: layer_tree_mask(cache.cache.layers[i], ancestors, depths, visible, model.dtype) for kind, i in first.items()}
    return layer_tree_mask(cache.cache.layers[0], ancestors, depths, visible, model.dtype)


# ---------------------------------------------------------------------------------------------
# Acceptance: one greedy and one sampling walk over a tree (a chain is a width-1 tree)
# ---------------------------------------------------------------------------------------------
@dataclass
class TreeAcceptance:
    """Result of walking a verified tree: accepted node indices (root excluded, in order), the
    token after them (`None` when the walk stopped on an accepted EOS) and the processed target
    scores of every node visited (one per new token)."""

    path: list[int]
    bonus: int | None
    scores: list[torch.Tensor]

    def tokens(self, tree: DraftTree) -> list[int]:
        """The new tokens: the accepted nodes' tokens, then the bonus token if any."""
        return [int(tree.tokens[node]) for node in self.path] + ([] if self.bonus is None else [self.bonus])


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`max(p - q, 0)` normalised: what to sample from after rejecting a draft proposed from `q`."""
    residual = (p - q).clamp(min=0)
    total = residual.sum(dim=-1, keepdim=True)
    # p == q up to rounding leaves nothing to redistribute: fall back to p itself
    return torch.where(total > 0, residual / total.clamp(min=torch.finfo(total.dtype).tiny), p)


def accept(tree: DraftTree, node_scores, do_sample: bool, eos_token_ids=None) -> TreeAcceptance:
    """Walk down `tree` from the root; `node_scores(node)` gives the target's processed scores
    `(1, vocab)` at a node. Greedy: follow the child equal to the target's argmax. Sampling:
    lossless multi-candidate speculative sampling (see the module docstring)."""
    node, path, visited = 0, [], []
    while True:
        scores = node_scores(node)
        visited.append(scores)
        if do_sample:
            p, child = scores[0].float().softmax(dim=-1), None
            for candidate in tree.children[node]:
                token = int(tree.tokens[candidate])
                if tree.proposals is None:
                    q = torch.zeros_like(p)
                    q[token] = 1.0
                else:
                    q = tree.proposals[candidate].float().softmax(dim=-1).to(p.device)
                if torch.rand((), device=p.device) * q[token] < p[token]:
                    child = candidate
                    break
                p = residual_distribution(p, q)
            token = int(tree.tokens[child]) if child is not None else int(torch.multinomial(p, 1))
        else:
            token = int(scores.argmax(dim=-1))
            child = tree.child_with_token(node, token)
        if child is None:
            return TreeAcceptance(path, token, visited)
        path.append(child)
        if eos_token_ids and token in eos_token_ids:
            return TreeAcceptance(path, None, visited)
        node = child


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
@dataclass
class _Row:
    """One input row's output so far."""

    prompt: torch.Tensor
    tokens: list[int] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    finished: bool = False

    def sequence(self) -> torch.Tensor:
        """The padded prompt plus the tokens so far: what plain generate shows the processors."""
        return torch.cat([self.prompt, torch.tensor(self.tokens, dtype=torch.long)])


def _prefill(model, input_ids, model_kwargs, hidden_layers):
    inputs = model.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **model_kwargs)
    inputs["output_hidden_states"] = hidden_layers
    return model(**inputs, return_dict=True)


@torch.no_grad()
def speculative_generate(model, input_ids, logits_processor, stopping_criteria, generation_config, drafter, model_kwargs,
                         tree: TreeSize | None = None, streamer=None, batched_stats: bool = True, options=None):
    """DREAM decoding of a batch of prompts (chains, or trees of the [`TreeSize`] `tree`, whose
    `total_tokens` may be `"auto"`), lossless per row, for the `custom_generate` entry points
    [`tree_generate`] and [`batched_generate`].

    Returns the sequences `(batch, prompt + new)` as plain generate lays them out (rows that
    finished early padded with `pad_token_id`), or a `GenerateDecoderOnlyOutput` with
    `return_dict_in_generate=True` (`scores` / `logits` when asked, steps after a row finished
    holding a point mass on the pad id; the cache for a batch of one). Statistics are in
    `drafter.last_stats` ([`DecodingStats`]; `batched_stats`: with the batch keys). `options`: this
    call's [`DreamDecodingOptions`] (draft length and schedule of chains; default: the drafter's).
    """
    from .tree import TreeDrafter

    check_dream_inputs(input_ids, model_kwargs)
    check_custom_loop_outputs(generation_config, "tree" if tree is not None else "batched")
    device = model.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    batch, width = input_ids.shape
    do_sample = bool(generation_config.do_sample)
    stopper = RowStopper(stopping_criteria, generation_config, width)
    pad = generation_config._pad_token_tensor
    pad = next(iter(sorted(stopper.eos_ids)), 0) if pad is None else pad
    pad_token_id = int(pad.reshape(-1)[0]) if torch.is_tensor(pad) else int(pad)
    stream = _Streamer(streamer, pad_token_id, input_ids)
    want_scores = generation_config.return_dict_in_generate and generation_config.output_scores
    want_logits = generation_config.return_dict_in_generate and generation_config.output_logits
    mask = model_kwargs.get("attention_mask")
    prompt_mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.to(device).bool()
    rows = [_Row(prompt) for prompt in input_ids.cpu()]
    state = DrafterState(model, drafter, batch, device, options=options)
    try:  # whatever happens, nothing of this call stays registered on the target
        stats = DecodingStats.new(batch, batched=batched_stats, tree=tree is not None)
        feature_layers = drafter.target_feature_layers

        # --- prefill: a plain target step that also gives the drafter every prompt's features ----
        state.start_prefill(input_ids)
        outputs = _prefill(model, input_ids, model_kwargs, sorted({0, *feature_layers}))
        cache = outputs.cache if getattr(outputs, "cache", None) is not None else model_kwargs["cache"]
        check_compactable(cache)
        sliding = any(isinstance(layer, DynamicSlidingWindowLayer) for layer in cache.layers)
        if sliding:
            cache.activate_past_recording()  # a verification pass must not evict entries a row still needs
        target_cache = RaggedCache(cache, prompt_mask.clone(), contiguous=sliding)
        raw = outputs.logits[:, -1].float()
        scores = logits_processor(input_ids, raw)
        first = torch.multinomial(scores.softmax(dim=-1), 1).squeeze(1) if do_sample else scores.argmax(dim=-1)
        for index, (row, token) in enumerate(zip(rows, first.tolist())):
            _, row.finished = stopper.cut(row.sequence, [token], lambda j, i=index: scores[i : i + 1], 0)
            row.tokens.append(token)
            row.scores += [scores[index : index + 1]] if want_scores else []
            row.logits += [raw[index : index + 1]] if want_logits else []
        stats.record_pass(None)
        stats.record_acceptance([0] * batch, [1] * batch)
        stream.flush(rows)
        active = [r for r in range(batch) if not rows[r].finished]
        output = None
        if active:
            # the target's positions (generate()'s own position ids: 3-D for M-RoPE, possibly offset for 1-D)
            positions = state.adapter.target_positions(input_ids, prompt_mask, model_kwargs)
            embeds, features = state.prompt_view(input_ids, prompt_mask, outputs.hidden_states)
            output = state.prefill(input_ids, prompt_mask, embeds, features, first, positions)
            stats.record_visual(state)
            if len(active) < batch:
                keep = torch.tensor(active, device=device)
                target_cache.select_rows(keep)
                state.select_rows(keep)
                output = _select_output(output, keep)
                target_cache.settle()
        del outputs

        tree_drafter = sizer = None
        if tree is not None and active:
            tree_drafter = TreeDrafter(state, logits_processor, stopper.eos_ids or None, batch)
            sizer = TreeSizer(model, drafter, state, stats) if tree.total_tokens == "auto" else None
        while active:
            # never draft past a row's budget: the verification pass adds one token itself
            budgets = [stopper.max_new_tokens - len(rows[r].tokens) - 1 for r in active]
            if tree_drafter is None:
                trees = _draft_chains(state, output, rows, active, budgets, logits_processor, do_sample, stopper, batch)
            else:
                settings = tree if sizer is None else sizer.settings
                trees = [
                    tree_drafter.draft(i, rows[r].sequence(), output, settings.top_k, min(settings.depth, budgets[i]), settings.total_tokens)
                    for i, r in enumerate(active)
                ]
            depths = tree_depths(trees)
            verification = verify(model, target_cache, trees, depths, state.verify_positions(depths), feature_layers, drafter.fuse_target_features)
            node_scores = TargetScores(logits_processor, verification.logits, trees, lambda i, active=active: rows[active[i]].sequence(), state.rows, batch)

            # --- accept, stop and record, per row --------------------------------------------------
            kept_nodes, new_tokens, still_active = [], [], []
            for i, r in enumerate(active):
                row, row_tree = rows[r], trees[i]
                walk = accept(row_tree, lambda node, i=i, scores=node_scores: scores(i, node), do_sample, stopper.eos_ids)
                proposed = walk.tokens(row_tree)
                kept, row.finished = stopper.cut(row.sequence, proposed, lambda j, walk=walk: walk.scores[j], len(row.tokens))
                row.tokens.extend(proposed[:kept])
                row.scores += walk.scores[:kept] if want_scores else []
                row.logits += [verification.logits[i, node : node + 1] for node in ([0] + walk.path)[:kept]] if want_logits else []
                kept_nodes.append([0] + walk.path[: kept - 1])
                new_tokens.append(proposed[:kept])
                if not row.finished:
                    still_active.append(i)
            drafted = [len(t) - 1 for t in trees]
            accepted = [len(t) - 1 for t in new_tokens]
            side = [sum(1 for node in nodes[1:] if t.ranks[node] > 0) for nodes, t in zip(kept_nodes, trees)]
            stats.record_pass(drafted, active)
            stats.record_acceptance(accepted, [len(t) for t in new_tokens], active, side)
            if tree_drafter is None:
                state.schedule.record(torch.tensor(drafted, device=device), torch.tensor(accepted, device=device))
            elif sizer is not None and any(d > 0 for d in drafted):
                sizer.record(sum(len(t) for t in new_tokens) / len(new_tokens))
            stream.flush(rows)

            # --- the target cache keeps every row's root and accepted path --------------------------
            size = verification.logits.shape[1]
            keep_columns = torch.zeros(len(active), size, dtype=torch.bool, device=device)
            for i, nodes in enumerate(kept_nodes):
                keep_columns[i, nodes] = True
            target_cache.extend(keep_columns)
            if not still_active:
                break
            features = verification.features
            if len(still_active) < len(active):
                keep = torch.tensor(still_active, device=device)
                target_cache.select_rows(keep)
                state.select_rows(keep)
                features = features[keep.to(features.device)]
            target_cache.settle()

            # --- the drafter catches up with the target's features of the kept tokens ---------------
            index = [kept_nodes[i] + kept_nodes[i][-1:] * (size - len(kept_nodes[i])) for i in still_active]
            index = torch.tensor(index, device=features.device)
            features = features.gather(1, index[..., None].expand(-1, -1, features.shape[-1]))
            active = [active[i] for i in still_active]
            output = state.catch_up([new_tokens[i] for i in still_active], features)
            del verification

        stream.flush(rows, final=True)
        stats.target_cache_compactions = target_cache.compactions
        stats.publish(drafter)
        stream.end()
        if batch == 1:
            target_cache.settle(force=True)  # a contiguous cache to hand back
        return build_output(generation_config, input_ids, rows, pad_token_id, cache if batch == 1 else None)
    finally:
        state.close()


def _draft_chains(state, output, rows, active, budgets, logits_processor, do_sample, stopper, batch_size) -> list[DraftTree]:
    """Every active row's chain draft, as width-1 trees (with the scores sampled drafts came from)."""
    device = state.lengths.device
    limits = torch.minimum(state.schedule.next_lengths(state), torch.tensor(budgets, device=device)).clamp(min=0)
    prefixes = functools.cache(lambda: [rows[r].sequence() for r in active])  # only if a processor reads them

    def process(logits, drafted):
        def step_prefixes():
            tokens = torch.stack(drafted, dim=1).cpu() if drafted else None
            return [p if tokens is None else torch.cat([p, tokens[i]]) for i, p in enumerate(prefixes())]

        return process_rows(logits_processor, logits, step_prefixes, state.rows, batch_size)

    draft = state.draft_chain(output, limits, process, do_sample, stopper.is_eos)
    counts = draft.counts.tolist()
    return [
        DraftTree.chain(rows[r].tokens[-1], draft.tokens[i, : counts[i]], None if draft.scores is None else draft.scores[i, : counts[i]])
        for i, r in enumerate(active)
    ]


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
class _Streamer:
    """Feeds a streamer the way plain generate does: the prompt, then one `(batch,)` column per
    step (finished rows get the pad id), once every unfinished row has produced that column, then `end()`."""

    def __init__(self, streamer, pad_token_id: int, prompt: torch.LongTensor):
        self.streamer, self.pad, self.sent = streamer, pad_token_id, 0
        if streamer is not None:
            streamer.put(prompt.cpu())

    def end(self) -> None:
        if self.streamer is not None:
            self.streamer.end()

    def flush(self, rows: list[_Row], final: bool = False) -> None:
        if self.streamer is None:
            return
        open_rows = [len(row.tokens) for row in rows if not row.finished]
        ready = max(len(row.tokens) for row in rows) if final or not open_rows else min(open_rows)
        for column in range(self.sent, ready):
            self.streamer.put(torch.tensor([row.tokens[column] if column < len(row.tokens) else self.pad for row in rows]))
        self.sent = max(self.sent, ready)


def build_output(generation_config, input_ids, rows: list[_Row], pad_token_id: int, cache=None):
    """The sequences (padded prompt, each row's tokens, `pad_token_id` after a row finished) or,
    with `return_dict_in_generate`, a `GenerateDecoderOnlyOutput` with scores / logits as asked
    (a finished row's later steps: a point mass on the pad id, as `-inf` everywhere else)."""
    batch, width = input_ids.shape
    steps = max(len(row.tokens) for row in rows)
    sequences = torch.full((batch, width + steps), pad_token_id, dtype=torch.long, device=input_ids.device)
    sequences[:, :width] = input_ids
    for index, row in enumerate(rows):
        sequences[index, width : width + len(row.tokens)] = torch.tensor(row.tokens, device=input_ids.device)
    if not generation_config.return_dict_in_generate:
        return sequences

    def padded(name):
        per_row = [getattr(row, name) for row in rows]
        if not per_row[0]:
            return None
        filler = torch.full_like(per_row[0][0], float("-inf"))
        filler[0, pad_token_id] = 0.0
        return tuple(torch.cat([r[t] if t < len(r) else filler for r in per_row]) for t in range(steps))

    return GenerateDecoderOnlyOutput(
        sequences=sequences,
        scores=padded("scores"),
        logits=padded("logits"),
        cache=cache,
    )


def _select_output(output, rows: torch.LongTensor):
    """The drafter output's rows `rows` (logits and features are all drafting needs)."""
    output.logits = output.logits.index_select(0, rows.to(output.logits.device))
    output.features = output.features.index_select(0, rows.to(output.features.device))
    return output
