"""`draft_schedule="auto"`: how many tokens a chain should draft, from what things cost here and
what this drafter gets accepted.

Each round drafts k tokens and the target verifies k + 1 positions in one pass. Under the usual
model of speculative decoding (each draft accepted with probability alpha once its predecessor
was), a round yields (1 - alpha^(k+1)) / (1 - alpha) tokens, bonus included, and costs one
verification pass over k + 1 tokens plus k drafter forwards. Both costs are timed once on this
machine (`tree_size.measure_verification_costs`, cached); alpha is estimated from the rounds seen so
far (accepted drafts over accepted drafts plus rejections, with a prior worth two rounds and old
rounds fading), and remembered per (target, drafter) for the next call. On a GPU, where a pass over
9 tokens costs about one step, a good drafter drafts long chains; on a CPU where it costs two steps,
a weak drafter drafts one or two tokens.
"""

from __future__ import annotations

from .tree_size import measure_draft_level_cost, measure_verification_costs, monotone_costs

MAX_DRAFT_TOKENS = 8
# verification pass sizes actually timed (each costs four target passes); the others are interpolated.
# Timing all nine cost ~5 s on the first call on a 2-core CPU with a 135M target.
MEASURED_SIZES = (1, 2, 3, 5, 9)
PRIOR_ACCEPTANCE = 0.7
PRIOR_ROUNDS = 2.0
FADE = 0.95  # weight kept by earlier rounds at each new one: follows a drafter whose luck changes within an answer
_ESTIMATES: dict[tuple[int, int], tuple[float, float]] = {}


def expected_tokens(alpha: float, drafts: int) -> float:
    """Expected new tokens of a round with `drafts` drafted tokens (bonus token included)."""
    if alpha >= 1.0:
        return drafts + 1.0
    return (1.0 - alpha ** (drafts + 1)) / (1.0 - alpha)


def best_draft_length(alpha: float, verification_costs: dict[int, float], draft_step_cost: float) -> int:
    """The number of drafts k >= 1 that maximises expected tokens per second, given the seconds of
    a verification pass over n tokens (`verification_costs[n]`, n = k + 1) and of one drafter forward."""
    costs = monotone_costs(verification_costs)
    best, best_rate = 1, -1.0
    for drafts in range(1, MAX_DRAFT_TOKENS + 1):
        if drafts + 1 not in costs:
            break
        rate = expected_tokens(alpha, drafts) / (costs[drafts + 1] + drafts * draft_step_cost)
        if rate > best_rate:
            best, best_rate = drafts, rate
    return best


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


class DraftLengthChooser:
    """Picks each round's chain length for one `generate` call (see the module docstring)."""

    def __init__(self, target, drafter):
        self.key = (id(target), id(drafter))
        prior_accepted = PRIOR_ROUNDS * PRIOR_ACCEPTANCE / (1.0 - PRIOR_ACCEPTANCE)
        self.accepted, self.rejections = _ESTIMATES.get(self.key, (prior_accepted, PRIOR_ROUNDS))
        self.target = target
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
        self.step_cost = measure_draft_level_cost(state)  # a one-token drafter forward on the verified cache

    def next_length(self) -> int:
        """Drafts for the coming round."""
        return best_draft_length(self.acceptance, self.costs, self.step_cost)

    def record(self, drafted: int, accepted: int) -> None:
        """Account for a verified round and remember the estimate for the next call."""
        if drafted == 0:
            return
        self.accepted = FADE * self.accepted + accepted
        self.rejections = FADE * self.rejections + (1.0 if accepted < drafted else 0.0)
        _ESTIMATES[self.key] = (self.accepted, self.rejections)

