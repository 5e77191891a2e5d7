"""One cost model for how much to draft: chain length (`draft_schedule="auto"`) and tree size
(`tree_total_tokens="auto"`), from what things cost on *this* machine and what this drafter gets
accepted.

A round that drafts with `steps` drafter forwards and verifies N tokens in one target pass yields
`expected` new tokens (bonus included) and costs `verify(N) + steps * draft_step`; we pick the
shape with the most expected tokens per second. A verification pass over N tokens costs about one
decoding step while the hardware has idle compute (a GPU up to ~64 tokens, a plain fp32 CPU only
a few), so the best shape is hardware-specific. Both costs are timed once per process: target
passes over a few sizes on a cached random context (per target, device, dtype and context bucket),
and one drafter forward on the verified state.

Acceptance models, each starting from a prior and re-estimated from the rounds seen, then
remembered per (target, drafter) for the next call:
- chains: each draft is accepted with probability alpha once its predecessor was, so k drafts give
  `(1 - alpha^(k+1)) / (1 - alpha)` tokens; alpha = accepted / (accepted + rejections), a prior
  worth two rounds, old rounds fading.
- trees: tau(N) = 1 + slope * log2(1 + N) (EAGLE-2's measurements grow roughly logarithmically);
  the slope is re-fitted every `ADAPT_EVERY_PASSES` passes.
Caches are keyed by weak references to the models, so an entry dies with its model.
"""

from __future__ import annotations

import math
import statistics
import time
import weakref
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .stats import TreeSizeChoice, TreeSizeRecord

# chains
MAX_DRAFT_TOKENS = 8
# verification pass sizes timed for chains (the others are interpolated): timing all nine cost
# ~5 s on the first call on a 2-core CPU with a 135M target
MEASURED_SIZES = (1, 2, 3, 5, 9)
PRIOR_ACCEPTANCE = 0.7
PRIOR_ROUNDS = 2.0
FADE = 0.95  # weight kept by earlier rounds at each new one: follows a drafter whose luck changes within an answer
# trees
CANDIDATE_SIZES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_ACCEPTANCE_SLOPE = 0.8
ADAPT_EVERY_PASSES = 2
SLOPE_RANGE = (0.05, 2.0)


class PairMemory:
    """Values remembered per (target, drafter) pair (or per target with `drafter=None`), held
    through weak references: an entry goes when either model is garbage-collected."""

    def __init__(self):
        self._by_target: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, target, drafter, key=None, default=None):
        """The value kept for (`target`, `drafter`) under `key`, else `default`."""
        per_target = self._by_target.get(target)
        if per_target is None:
            return default
        table = per_target["plain"] if drafter is None else per_target["drafters"].get(drafter, {})
        return table.get(key, default)

    def set(self, target, drafter, value, key=None) -> None:
        """Keep `value` for (`target`, `drafter`) under `key`."""
        per_target = self._by_target.setdefault(target, {"drafters": weakref.WeakKeyDictionary(), "plain": {}})
        table = per_target["plain"] if drafter is None else per_target["drafters"].setdefault(drafter, {})
        table[key] = value


_COSTS = PairMemory()  # per target: (device, dtype, context bucket, sizes) -> seconds per pass size
_ESTIMATES = PairMemory()  # per (target, drafter): the chain acceptance estimate (accepted, rejections)
_SLOPES = PairMemory()  # per (target, drafter): the tree acceptance slope


# ---------------------------------------------------------------------------------------------
# Timings
# ---------------------------------------------------------------------------------------------
def median_seconds(fn, repeats: int, warmup: int = 0) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` untimed ones. On a GPU the device is
    synchronised around each call: kernels run asynchronously, so the clock alone would time their launch."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_verification_costs(model, context_length: int, sizes=CANDIDATE_SIZES, repeats: int = 3) -> dict[int, float]:
    """Median seconds of a target pass over `n` new tokens after a cached `context_length`-token
    text context, for each `n` in `sizes` (cached per target, device, dtype and context bucket)."""
    bucket = 1 << max(6, math.ceil(math.log2(max(context_length, 1))))
    device = model.get_input_embeddings().weight.device
    key = (str(device), str(model.dtype), bucket, tuple(sizes))
    cached = _COSTS.get(model, None, key)
    if cached is not None:
        return cached
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    # ordinary text ids (ids near the top of the vocabulary are often special: image placeholders)
    context = torch.randint(10, vocab // 2, (1, bucket), generator=generator).to(device)
    cache = DynamicCache()
    # explicit positions: an M-RoPE target would otherwise reuse the rope deltas of its last generate() call
    with torch.no_grad():
        model(input_ids=context, position_ids=torch.arange(bucket, device=device)[None], cache=cache, use_cache=True)
        costs = {}
        for size in sizes:
            new = torch.randint(10, vocab // 2, (1, size), generator=generator).to(device)
            positions = torch.arange(bucket, bucket + size, device=device)[None]

            def step(new=new, size=size, positions=positions):
                model(input_ids=new, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=size)
                cache.crop(-size)

            step()  # warm-up of this shape
            costs[size] = median_seconds(step, repeats)
    _COSTS.set(model, None, costs, key)
    return costs


def measure_draft_step_cost(state, repeats: int = 3) -> float:
    """Median seconds of one drafter forward of one token on a copy of the first row of a
    [`DrafterState`]'s verified cache and feature memory: one chain draft step, or about one tree
    level (a level batches its few frontier rows into one forward, which costs about the same)."""
    drafter = state.drafter
    embeds = torch.zeros(1, 1, drafter.config.hidden_size, dtype=drafter.dtype, device=drafter.device)
    positions = state.lengths[:1, None]
    memory = state.memory.fork(torch.zeros(1, dtype=torch.long), len(state.memory))
    cache = DynamicCache()
    for index, layer in enumerate(state.cache.cache.layers):
        cache.update(layer.keys[:1].clone(), layer.values[:1].clone(), index)

    def step():
        with torch.no_grad():
            drafter(embeds, positions, memory=memory, cache=cache)
        cache.crop(-1)

    step()
    return median_seconds(step, repeats)


def monotone_costs(verification_costs: dict[int, float]) -> dict[int, float]:
    """The costs with each pass at least as dear as any shorter one: a pass over more tokens never
    really costs less, so a lower reading is timing noise."""
    costs, floor = {}, 0.0
    for size, seconds in sorted(verification_costs.items()):
        costs[size] = floor = max(floor, seconds)
    return costs


def interpolate_costs(measured: dict[int, float], sizes) -> dict[int, float]:
    """`measured` (seconds per pass size) extended to every size in `sizes` by linear interpolation."""
    points = sorted(measured.items())
    costs = {}
    for size in sizes:
        below = max((p for p in points if p[0] <= size), default=points[0])
        above = min((p for p in points if p[0] >= size), default=points[-1])
        if above[0] == below[0]:
            costs[size] = below[1]
        else:
            costs[size] = below[1] + (above[1] - below[1]) * (size - below[0]) / (above[0] - below[0])
    return costs


def best_shape(shapes, verification_costs: dict[int, float], draft_step_cost: float):
    """The shape with the most expected tokens per second. `shapes` yields `(shape, expected
    tokens, tokens verified, drafter forwards)`; costs are read through `monotone_costs`."""
    costs = monotone_costs(verification_costs)
    best, best_rate = None, -1.0
    for shape, expected, verified, steps in shapes:
        if verified not in costs:
            continue
        rate = expected / (costs[verified] + steps * draft_step_cost)
        if rate > best_rate:
            best, best_rate = shape, rate
    return best


# ---------------------------------------------------------------------------------------------
# Chains
# ---------------------------------------------------------------------------------------------
def expected_tokens(alpha: float, drafts: int) -> float:
    """Expected new tokens of a round with `drafts` drafted tokens (bonus token included)."""
    if alpha >= 1.0:
        return drafts + 1.0
    return (1.0 - alpha ** (drafts + 1)) / (1.0 - alpha)


def best_draft_length(alpha: float, verification_costs: dict[int, float], draft_step_cost: float) -> int:
    """The number of drafts k >= 1 that maximises expected tokens per second, given the seconds of
    a verification pass over n tokens (`verification_costs[n]`, n = k + 1) and of one drafter forward."""
    shapes = ((k, expected_tokens(alpha, k), k + 1, k) for k in range(1, MAX_DRAFT_TOKENS + 1))
    return best_shape(shapes, verification_costs, draft_step_cost) or 1


class DraftLengthChooser:
    """Picks each round's chain length for one `generate` call (see the module docstring)."""

    def __init__(self, target, drafter):
        self.target, self.drafter = target, drafter
        prior_accepted = PRIOR_ROUNDS * PRIOR_ACCEPTANCE / (1.0 - PRIOR_ACCEPTANCE)
        self.accepted, self.rejections = _ESTIMATES.get(target, drafter, default=(prior_accepted, PRIOR_ROUNDS))
        self.costs: dict[int, float] | None = None
        self.step_cost = 0.0

    @property
    def acceptance(self) -> float:
        """Current estimate of the per-token acceptance rate alpha."""
        return self.accepted / (self.accepted + self.rejections)

    def measure(self, state, context_length: int) -> None:
        """Time verification passes over 1..MAX_DRAFT_TOKENS+1 tokens (a few sizes, cached; the rest
        interpolated) and one drafter forward."""
        measured = measure_verification_costs(self.target, context_length, sizes=MEASURED_SIZES)
        self.costs = interpolate_costs(measured, range(1, MAX_DRAFT_TOKENS + 2))
        self.step_cost = measure_draft_step_cost(state)

    def next_length(self) -> int:
        """Drafts for the coming round."""
        return best_draft_length(self.acceptance, self.costs, self.step_cost)

    def record(self, drafted: int, accepted: int) -> None:
        """Account for a verified round and remember the estimate for the next call."""
        if drafted == 0:
            return
        self.accepted = FADE * self.accepted + accepted
        self.rejections = FADE * self.rejections + (1.0 if accepted < drafted else 0.0)
        _ESTIMATES.set(self.target, self.drafter, (self.accepted, self.rejections))


# ---------------------------------------------------------------------------------------------
# Trees
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TreeSize:
    """A draft-tree shape: children per expanded node and frontier nodes per level (`top_k`), longest
    drafted path (`depth`), and nodes verified per pass (`total_tokens`; `"auto"` asks [`TreeSizer`])."""

    top_k: int
    depth: int
    total_tokens: int | str


def choose_tree_size(verification_costs: dict[int, float], draft_level_cost: float, slope: float = DEFAULT_ACCEPTANCE_SLOPE) -> TreeSize:
    """The tree maximising expected tokens per second: tau(N) / (verify(N) + depth(N) * draft level).
    N = 1 means "no tree": one drafted token, i.e. a chain step."""

    def shapes():
        for total in sorted(verification_costs):
            depth = max(1, min(8, round(math.log2(total)) + 1))
            size = TreeSize(top_k=max(1, min(4, total)), depth=min(depth, total), total_tokens=total)
            yield size, 1.0 + slope * math.log2(1 + total), total, depth

    return best_shape(shapes(), verification_costs, draft_level_cost)


def observed_acceptance_slope(tokens_per_pass: float, total_tokens: int) -> float:
    """The slope of the acceptance model that explains `tokens_per_pass` (accepted + bonus, per
    target pass) seen with trees of `total_tokens` nodes, clipped to `SLOPE_RANGE`."""
    slope = (tokens_per_pass - 1.0) / math.log2(1 + total_tokens)
    return min(max(slope, SLOPE_RANGE[0]), SLOPE_RANGE[1])


class TreeSizer:
    """`tree_total_tokens="auto"` for one `generate` call: the current `settings`, re-chosen every
    `ADAPT_EVERY_PASSES` passes from the acceptance observed; every choice is kept in `stats.tree_size`."""

    def __init__(self, model, drafter, state, stats):
        self.model, self.drafter, self.stats = model, drafter, stats
        self.costs = measure_verification_costs(model, int(state.lengths[0]))
        self.level_cost = measure_draft_step_cost(state)
        self.slope = _SLOPES.get(model, drafter, default=DEFAULT_ACCEPTANCE_SLOPE)
        self.settings = size = choose_tree_size(self.costs, self.level_cost, self.slope)
        stats.tree_size = TreeSizeRecord(size.top_k, size.depth, size.total_tokens, self.costs, [TreeSizeChoice(size.total_tokens, self.slope)])
        self.window_passes = self.window_tokens = 0

    def record(self, tokens_per_pass: float) -> None:
        """After a pass that drafted: `tokens_per_pass` new tokens per row (bonus included)."""
        self.window_passes, self.window_tokens = self.window_passes + 1, self.window_tokens + tokens_per_pass
        if self.window_passes < ADAPT_EVERY_PASSES:
            return
        # half the new window, half the history: two passes alone are a noisy estimate
        observed = observed_acceptance_slope(self.window_tokens / self.window_passes, self.settings.total_tokens)
        self.slope = 0.5 * self.slope + 0.5 * observed
        _SLOPES.set(self.model, self.drafter, self.slope)
        self.settings = size = choose_tree_size(self.costs, self.level_cost, self.slope)
        record = self.stats.tree_size
        record.top_k, record.depth, record.total_tokens = size.top_k, size.depth, size.total_tokens
        record.history.append(TreeSizeChoice(size.total_tokens, self.slope))
        self.window_passes = self.window_tokens = 0
