"""The one KV-cache bookkeeping of the custom decoding loops: a `DynamicCache` whose rows hold
different numbers of real entries (ragged batches, rejected drafts, pruned tree branches),
covering full and sliding-window layers. Used for the target's cache and the drafter's."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

# Stop compacting a hole-tolerant cache until the columns it would save exceed this fraction.
DEFAULT_MAX_WASTE = 0.25


def check_compactable(cache) -> None:
    """Compaction rewrites dynamic (full or sliding-window) KV layers; anything else (static,
    quantized, offloaded, linear-attention caches) cannot drop arbitrary entries."""
    for layer in getattr(cache, "layers", None) or []:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise ValueError(
                f"DREAM decoding needs a DynamicCache of full or sliding-window layers, got a {type(layer).__name__} layer."
            )


class RaggedCache:
    """A `DynamicCache` shared by rows of different lengths, plus `valid (rows, columns)`: which
    cache columns hold real entries of each row (left padding, rejected drafts and pruned tree
    nodes do not).

    Every forward appends the same number of columns to every row; the invalid ones are masked
    out (a 2-D mask from `attention_mask(new)`, or the `visible` columns of a tree mask), and each
    row gets explicit position ids, so a row never sees another row's padding or its own
    rejected drafts.

    `contiguous=True` (the target has sliding-window layers): sliding windows are counted in
    cache columns, so every row must stay a contiguous block at the right end of the cache, as in
    plain left-padded generate. Rows are then compacted after every round that left holes.
    Otherwise holes are harmless and the cache is compacted only when that would remove more than
    `max_waste` of its columns, so copies stay amortised O(1) per generated token.
    """

    def __init__(self, cache, valid: torch.BoolTensor, contiguous: bool = False, max_waste: float = DEFAULT_MAX_WASTE):
        self.cache = cache
        self.valid = valid
        self.contiguous = contiguous
        self.max_waste = max_waste
        self.compactions = 0
        self._full: bool | None = None  # whether every column is real (cached; None: not known)

    @property
    def valid(self) -> torch.BoolTensor:
        return self._valid

    @valid.setter
    def valid(self, value: torch.BoolTensor) -> None:
        self._valid, self._full = value, None

    @property
    def full(self) -> bool:
        """Whether every column of every row is real (no padding, no holes)."""
        if self._full is None:
            self._full = bool(self._valid.all())
        return self._full

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def attention_mask(self, new) -> torch.LongTensor | None:
        """2-D mask for a forward that appends columns: `new` is their count (all real) or their
        `(rows, count)` validity (a left-padded block). None when every column is real."""
        if isinstance(new, int):
            if self.full:
                return None
            new = self.valid.new_ones(self.valid.shape[0], new)
        mask = torch.cat([self.valid, new.to(self.valid.device)], dim=1)
        return None if bool(mask.all()) else mask.long()

    def extend(self, new_valid) -> None:
        """Record the columns the last forward appended: their count (all real) or `(rows, count)` validity."""
        full = self._full
        if isinstance(new_valid, int):
            new_valid = self.valid.new_ones(self.valid.shape[0], new_valid)
        else:
            full = None
        self.valid = torch.cat([self.valid, new_valid.to(self.valid.device)], dim=1)
        self._full = full

    def drop_last(self, count: int) -> None:
        """Remove the last `count` columns of every row."""
        if count <= 0:
            return
        for layer in self._layers():
            stored = layer.keys.shape[-2]
            layer.keys, layer.values = layer.keys[..., : stored - count, :], layer.values[..., : stored - count, :]
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer.cumulative_length -= count
        self.valid = self.valid[:, :-count]

    def select_rows(self, rows: torch.LongTensor) -> None:
        """Keep only `rows` (finished rows leave the batch)."""
        for layer in self._layers():
            index = rows.to(layer.keys.device)
            layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        self.valid = self.valid.index_select(0, rows.to(self.valid.device))

    def settle(self, force: bool = False) -> None:
        """After a round: drop columns no row uses at the end, compact if the policy says so (or
        `force`), and bring sliding-window layers back to their window."""
        if self.full:  # nothing to drop or move
            self._trim_sliding()
            return
        real_columns = self.valid.any(dim=0)
        trailing = self.length - (int(real_columns.nonzero().max()) + 1 if real_columns.any() else 0)
        self.drop_last(trailing)
        counts = self.valid.sum(dim=1)
        if force or self.contiguous:
            right_aligned = torch.arange(self.length, device=counts.device)[None] >= (self.length - counts)[:, None]
            if not torch.equal(self.valid, right_aligned):
                self.compact()
        elif self.length - int(counts.max()) > self.max_waste * self.length:
            self.compact()
        self._trim_sliding()

    def compact(self) -> None:
        """Gather every row's real entries, in order, into a right-aligned (left-padded) layout of
        `max(real entries)` columns."""
        length = self.length
        counts = self.valid.sum(dim=1)
        new_length = int(counts.max())
        # a stable sort puts each row's invalid columns first and its valid ones after, in order
        order = torch.sort(self.valid.to(torch.int32), dim=1, stable=True).indices
        index = order[:, length - new_length :]
        for layer in self._layers():
            stored = layer.keys.shape[-2]
            layer_index = index
            if isinstance(layer, DynamicSlidingWindowLayer):
                # The layer stores the last `stored` columns only. A row's last `window - 1` real
                # entries all lie in them (the layout was contiguous before this round's pass,
                # whose entries were all kept by past recording), so only padding maps below it.
                keep = min(new_length, layer.sliding_window - 1)
                layer_index = (index[:, new_length - keep :] - (length - stored)).clamp(min=0)
                layer.cumulative_length = new_length
            layer_index = layer_index.to(layer.keys.device)
            gather = layer_index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys, layer.values = layer.keys.gather(2, gather), layer.values.gather(2, gather)
        self.valid = torch.arange(new_length, device=counts.device)[None] >= (new_length - counts)[:, None]
        self.compactions += 1

    def _trim_sliding(self) -> None:
        for layer in self._layers():
            if isinstance(layer, DynamicSlidingWindowLayer) and layer.keys.shape[-2] > layer.sliding_window - 1:
                layer.keys = layer.keys[:, :, -layer.sliding_window + 1 :]
                layer.values = layer.values[:, :, -layer.sliding_window + 1 :]

    def _layers(self):
        for layer in self.cache.layers:
            if layer.is_initialized and layer.keys is not None and layer.keys.numel() > 0:
                yield layer


def compact_cache(cache, num_tree: int, keep: torch.LongTensor) -> None:
    """Keep, in every layer of a batch-1 cache, the entries before the last `num_tree` plus those
    of them listed in `keep` (ascending indices into the last pass), dropping the others.

    Sliding layers must record their past (`cache.activate_past_recording()` before the pass)
    so that it did not evict entries; they are trimmed back to their window here."""
    total = cache.get_seq_length()
    valid = torch.ones(1, total, dtype=torch.bool, device=keep.device)
    valid[0, total - num_tree :] = False
    valid[0, total - num_tree + keep] = True
    RaggedCache(cache, valid).settle(force=True)
