"""Decoding statistics, one typed record for every mode; `drafter.last_stats` is its dict read-out."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RowStats:
    """One sequence's statistics: target passes it took part in (prefill included), tokens
    drafted and accepted (per pass and in total; the prefill drafts nothing, so
    `drafted_per_pass` has one entry fewer), new tokens, visual tokens seen and kept by the
    drafter, and accepted tree nodes that were not their parent's top draft."""

    target_passes: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    new_tokens: int = 0
    accepted_per_pass: list[int] = field(default_factory=list)
    drafted_per_pass: list[int] = field(default_factory=list)
    visual_tokens: int = 0
    visual_tokens_kept: int = 0
    side_branch_tokens: int = 0

    @property
    def acceptance_length(self) -> float:
        """New tokens per target pass, bonus token included (tau)."""
        return self.new_tokens / self.target_passes if self.target_passes else 0.0

    def as_dict(self, tree: bool) -> dict:
        """The batch-1 read-out keys (`side_branch_tokens` for trees)."""
        out = asdict(self)
        out["acceptance_length"] = self.acceptance_length
        if not tree:
            del out["side_branch_tokens"]
        return out


@dataclass
class TreeSizeChoice:
    """One `"auto"` tree-size choice: the size and the acceptance slope that chose it."""

    total_tokens: int
    slope: float


@dataclass
class TreeSizeRecord:
    """`tree_total_tokens="auto"`: the current size, the timings it was chosen from, every choice."""

    top_k: int
    depth: int
    total_tokens: int
    verification_seconds: dict[int, float]
    history: list[TreeSizeChoice] = field(default_factory=list)


@dataclass
class DecodingStats:
    """Statistics of one `generate` call: per-row records plus what the batch did per pass.

    The read-out (`as_dict`, kept in `drafter.last_stats`) of a batch-1 chain or tree call has the
    row's keys. A batched call (`batched=True`) adds, with batch-level keys summed over rows:
    `batch_size`, `row_passes` (active rows summed over passes), `acceptance_length =
    new_tokens / row_passes` (a row's mean gain per pass it takes part in), `tokens_per_pass =
    new_tokens / target_passes` (what the batch gains per forward), `active_rows_per_pass`,
    `target_cache_compactions` and `rows` (each row's own read-out, as if decoded alone).
    """

    rows: list[RowStats]
    batched: bool = False
    tree: bool = False
    active_rows_per_pass: list[int] = field(default_factory=list)
    accepted_per_pass: list[int] = field(default_factory=list)
    drafted_per_pass: list[int] = field(default_factory=list)
    target_cache_compactions: int = 0
    tree_size: TreeSizeRecord | None = None

    @classmethod
    def new(cls, batch_size: int, batched: bool = False, tree: bool = False) -> DecodingStats:
        """Zeroed statistics of `batch_size` rows."""
        return cls(rows=[RowStats() for _ in range(batch_size)], batched=batched, tree=tree)

    def record_pass(self, drafted: list[int] | None, rows: list[int] | None = None) -> None:
        """A target pass in which `rows` (default: all) took part, having drafted `drafted[i]`
        tokens for row `rows[i]` (None: the prefill)."""
        rows = list(range(len(self.rows))) if rows is None else rows
        self.active_rows_per_pass.append(len(rows))
        if drafted is not None:
            self.drafted_per_pass.append(sum(drafted))
        for i, row in enumerate(rows):
            record = self.rows[row]
            record.target_passes += 1
            if drafted is not None:
                record.drafted_tokens += drafted[i]
                record.drafted_per_pass.append(drafted[i])

    def record_acceptance(self, accepted: list[int], new: list[int], rows: list[int] | None = None, side: list[int] | None = None) -> None:
        """The outcome of the last pass: drafts accepted, tokens gained and side-branch nodes accepted, per row."""
        rows = list(range(len(self.rows))) if rows is None else rows
        self.accepted_per_pass.append(sum(accepted))
        for i, row in enumerate(rows):
            record = self.rows[row]
            record.accepted_tokens += accepted[i]
            record.accepted_per_pass.append(accepted[i])
            record.new_tokens += new[i]
            record.side_branch_tokens += side[i] if side is not None else 0

    def record_visual(self, state) -> None:
        """Visual tokens each row's prompt has and the drafter kept, from a fresh [`DrafterState`]."""
        for record, total, kept in zip(self.rows, state.visual_tokens, state.visual_tokens_kept):
            record.visual_tokens, record.visual_tokens_kept = total, kept

    def as_dict(self) -> dict:
        """The `drafter.last_stats` read-out (see the class docstring)."""
        if not self.batched:
            out = self.rows[0].as_dict(self.tree)
        else:
            rows = [row.as_dict(self.tree) for row in self.rows]
            passes, row_passes = len(self.active_rows_per_pass), sum(self.active_rows_per_pass)
            summed = ["drafted_tokens", "accepted_tokens", "new_tokens", "visual_tokens", "visual_tokens_kept"]
            out = {key: sum(row[key] for row in rows) for key in summed + (["side_branch_tokens"] if self.tree else [])}
            out.update(
                target_passes=passes,
                acceptance_length=out["new_tokens"] / row_passes if row_passes else 0.0,
                accepted_per_pass=list(self.accepted_per_pass),
                drafted_per_pass=list(self.drafted_per_pass),
                batch_size=len(self.rows),
                row_passes=row_passes,
                tokens_per_pass=out["new_tokens"] / passes if passes else 0.0,
                active_rows_per_pass=list(self.active_rows_per_pass),
                target_cache_compactions=self.target_cache_compactions,
                rows=rows,
            )
        if self.tree_size is not None:
            out["tree_size"] = asdict(self.tree_size)
        return out

    def publish(self, drafter) -> None:
        """Refresh `drafter.last_stats`, the user-facing read-out."""
        drafter.last_stats = self.as_dict()
