"""`tree_total_tokens="auto"`: size the draft tree from what verification costs on *this* machine.

A verification pass over N tree nodes costs about as much as one decoding step while the
hardware has idle compute (a GPU up to ~64 tokens, a CPU with bf16 matrix units up to ~16-64,
a plain fp32 CPU only a few tokens). The best tree is therefore hardware-specific. We time
target passes over N = 1, 2, 4, ... new tokens on a cached context and a drafter level, then
pick the N that maximises the expected tokens per second under an acceptance model
tau(N) = 1 + slope * log2(1 + N) (acceptance grows roughly logarithmically with tree size in
EAGLE-2's measurements; slope ~0.8 for a well-trained drafter). That slope is only the prior:
during generation the slope is re-estimated from the acceptance actually observed and the size
chosen again (`ADAPT_EVERY_PASSES`), so a drafter that rarely hits gets small trees and a good
one large trees; the last estimate is remembered per (target, drafter) as the next call's
starting point, since answers are often only a few passes long. Measurements are cached per
(target, device, dtype, context length bucket), so only the first call pays (~1 s on a
135M-parameter target on 2 CPU cores).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

CANDIDATE_SIZES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_ACCEPTANCE_SLOPE = 0.8
ADAPT_EVERY_PASSES = 2
SLOPE_RANGE = (0.05, 2.0)
_COSTS: dict[tuple, dict[int, float]] = {}
_SLOPES: dict[tuple[int, int], float] = {}


@dataclass(frozen=True)
class TreeSize:
    """A draft-tree shape: children per expanded node (`top_k`), `depth`, and nodes verified per pass (`total_tokens`)."""

    top_k: int
    depth: int
    total_tokens: int


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
    key = (id(model), str(device), str(model.dtype), bucket, tuple(sizes))
    if key in _COSTS:
        return _COSTS[key]
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    # ordinary text ids (ids near the top of the vocabulary are often special: image placeholders)
    context = torch.randint(10, vocab // 2, (1, bucket), generator=generator).to(device)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=context, cache=cache, use_cache=True)
        costs = {}
        for size in sizes:
            new = torch.randint(10, vocab // 2, (1, size), generator=generator).to(device)

            def step(new=new, size=size):
                model(input_ids=new, cache=cache, use_cache=True, logits_to_keep=size)
                cache.crop(-size)

            step()  # warm-up of this shape
            costs[size] = median_seconds(step, repeats)
    _COSTS[key] = costs
    return costs


def monotone_costs(verification_costs: dict[int, float]) -> dict[int, float]:
    """The costs with each pass at least as dear as any shorter one: a pass over more tokens never
    really costs less, so a lower reading is timing noise."""
    costs, floor = {}, 0.0
    for size, seconds in sorted(verification_costs.items()):
        costs[size] = floor = max(floor, seconds)
    return costs


def choose_tree_size(
    verification_costs: dict[int, float], draft_level_cost: float, slope: float = DEFAULT_ACCEPTANCE_SLOPE
) -> TreeSize:
    """The tree maximising expected tokens per second: tau(N) / (verify(N) + depth(N) * draft level).

    `draft_level_cost` is the seconds of one batched drafter level (one drafter forward over the
    frontier). N = 1 means "no tree": one drafted token, i.e. a chain step."""
    best, best_rate = None, -1.0
    for total, verify in sorted(monotone_costs(verification_costs).items()):
        depth = max(1, min(8, round(math.log2(total)) + 1))
        expected_tokens = 1.0 + slope * math.log2(1 + total)
        rate = expected_tokens / (verify + depth * draft_level_cost)
        if rate > best_rate:
            best, best_rate = TreeSize(top_k=max(1, min(4, total)), depth=min(depth, total), total_tokens=total), rate
    return best


def observed_acceptance_slope(tokens_per_pass: float, total_tokens: int) -> float:
    """The slope of the acceptance model that explains `tokens_per_pass` (accepted + bonus, per
    target pass) seen with trees of `total_tokens` nodes, clipped to `SLOPE_RANGE`."""
    slope = (tokens_per_pass - 1.0) / math.log2(1 + total_tokens)
    return min(max(slope, SLOPE_RANGE[0]), SLOPE_RANGE[1])


def remembered_slope(model, drafter) -> float:
    """The acceptance slope last observed for this (target, drafter) pair, else the prior."""
    return _SLOPES.get((id(model), id(drafter)), DEFAULT_ACCEPTANCE_SLOPE)


def remember_slope(model, drafter, slope: float) -> None:
    """Keep `slope` as the starting estimate of the next `"auto"` call with this (target, drafter) pair."""
    _SLOPES[(id(model), id(drafter))] = slope


def measure_draft_level_cost(state, repeats: int = 3) -> float:
    """Median seconds of one drafter forward of one token on a copy of the first row of a
    [`DrafterState`]'s verified cache and feature memory: about the cost of expanding one tree
    level (a level batches its few frontier rows into one forward, which on these sizes costs
    about the same) or of one chain draft step."""
    drafter = state.drafter
    embeds = torch.zeros(1, 1, drafter.config.hidden_size, dtype=drafter.dtype, device=drafter.device)
    positions = state.lengths[:1, None]
    memory = state.memory.fork(torch.zeros(1, dtype=torch.long), len(state.memory))
    cache = DynamicCache()
    for index, layer in enumerate(state.cache.cache.layers):
        cache.update(layer.keys[:1].clone(), layer.values[:1].clone(), index)

    def level():
        with torch.no_grad():
            drafter(embeds, positions, memory=memory, cache=cache)
        cache.crop(-1)

    level()
    return median_seconds(level, repeats)


class TreeSizer:
    """`tree_total_tokens="auto"` for one `generate` call: the tree size with the best expected
    tokens per second from this machine's timings and the acceptance slope, re-chosen every
    `ADAPT_EVERY_PASSES` passes from the acceptance observed (kept in `stats.tree_size`)."""

    def __init__(self, model, drafter, state, stats):
        from .stats import TreeSizeChoice, TreeSizeRecord

        self.model, self.drafter, self.stats, self.choice = model, drafter, stats, TreeSizeChoice
        self.costs = measure_verification_costs(model, int(state.lengths[0]))
        self.level_cost = measure_draft_level_cost(state)
        self.slope = remembered_slope(model, drafter)
        self.settings = choose_tree_size(self.costs, self.level_cost, self.slope)
        size = self.settings
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
        remember_slope(self.model, self.drafter, self.slope)
        self.settings = size = choose_tree_size(self.costs, self.level_cost, self.slope)
        record = self.stats.tree_size
        record.top_k, record.depth, record.total_tokens = size.top_k, size.depth, size.total_tokens
        record.history.append(self.choice(size.total_tokens, self.slope))
        self.window_passes = self.window_tokens = 0
