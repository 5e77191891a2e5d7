"""Batched DREAM chain decoding (batch size > 1), lossless per row.

transformers' assisted-decoding loop handles one sequence only, so batches run through this
`custom_generate` loop instead. After `import hf_dream`, a DREAM `assistant_model` with a batch
of more than one prompt is routed here automatically:

```python
out = target.generate(**batched_inputs, assistant_model=drafter, max_new_tokens=64)
# the same as
out = target.generate(**batched_inputs, custom_generate=batched_generate, drafter=drafter, max_new_tokens=64)
```

One round, for every unfinished row at once:
1. **Draft**: the drafter proposes up to `k` tokens per row (`num_draft_tokens`, cut to the row's
   remaining budget, stopped after a drafted EOS), all rows in lockstep.
2. **Verify**: one target forward over `[last token, drafts...]` of every row, with explicit
   per-row position ids and a 2-D mask marking each row's real cache entries.
3. **Accept per row**: greedy rows keep the drafts that equal the target's argmax plus the
   target's next token; sampled rows use speculative sampling against the drafter's processed
   distribution (accept `d` with probability `min(1, p(d)/q(d))`, on rejection draw from the
   normalised residual `max(p - q, 0)`), so every row's output is distributed exactly as plain
   sampling and greedy output is token-identical to plain greedy decoding.
4. **Bookkeeping**: rows that hit EOS / their length budget / another stopping criterion leave
   the batch (their KV rows are dropped from both caches); the target cache keeps one column per
   verified position with rejected entries marked invalid, and is compacted when needed
   (see [`RaggedCache`]); the drafter catches up with the target's features of the accepted
   tokens, per row.

Rows are independent: the drafter indexes its feature memory by each row's own (unpadded)
sequence position, so a row drafts exactly what it would draft alone.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    MinPLogitsWarper,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..features import AttentionInputRecorder, attention_received, select_visual_tokens
from .candidate_generator import new_stats
from .tree import _prefill, check_compactable
from .validation import check_custom_masks, check_dream_call

# Processors whose output for a row depends on that row's scores only, never on its prefix or
# its length: they can run once over every (row, position) of a round.
ROW_WISE_PROCESSORS = (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    MinPLogitsWarper,
    TypicalLogitsWarper,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    SuppressTokensLogitsProcessor,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
)

# Stop compacting a hole-tolerant cache until the columns it would save exceed this fraction.
DEFAULT_MAX_WASTE = 0.25
# The drafter's feature memory grows in steps of this many positions (fewer reallocations).
MEMORY_GROWTH = 64


# ---------------------------------------------------------------------------------------------
# Logits processors and stopping criteria, per row
# ---------------------------------------------------------------------------------------------
def process_rows(logits_processor, scores: torch.Tensor, prefixes, rows: list[int], batch_size: int) -> torch.Tensor:
    """Apply `logits_processor` to `scores (n, vocab)`, score row i as batch row `rows[i]` with its
    own prefix.

    `prefixes` is a list of 1-D token tensors (score row i's sequence so far, exactly as plain
    generate would show it to the processors: padded prompt plus tokens) or a callable returning
    that list, called only when a processor reads prefixes. Some processors keep per-batch-row
    state (e.g. the repetition penalty's per-row prompt padding), so such processors are always
    called with the full batch in its original order: once per distinct prefix length, with the
    score rows of that length in their batch rows and placeholders (discarded) elsewhere.
    """
    if not logits_processor:
        return scores
    if all(isinstance(processor, ROW_WISE_PROCESSORS) for processor in logits_processor):
        placeholder = torch.zeros(scores.shape[0], 1, dtype=torch.long, device=scores.device)
        return logits_processor(placeholder, scores)
    prefixes = prefixes() if callable(prefixes) else prefixes
    groups: dict[int, list[int]] = defaultdict(list)
    for index, prefix in enumerate(prefixes):
        groups[len(prefix)].append(index)
    processed = torch.empty_like(scores)
    for length, members in groups.items():
        batch_rows = [rows[i] for i in members]
        if len(set(batch_rows)) != len(batch_rows):
            raise AssertionError("one batch row with two prefixes of the same length")
        ids = torch.zeros(batch_size, length, dtype=torch.long)
        full_scores = scores.new_zeros(batch_size, scores.shape[-1])
        for i, row in zip(members, batch_rows):
            ids[row] = prefixes[i]
            full_scores[row] = scores[i]
        out = logits_processor(ids.to(scores.device), full_scores)
        processed[torch.tensor(members, device=scores.device)] = out[torch.tensor(batch_rows, device=scores.device)]
    return processed


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

    def cut(self, sequence, new_tokens: list[int], scores) -> tuple[int, bool]:
        """How many of `new_tokens` the row keeps, and whether it is finished then. `sequence()`
        gives what they follow (the row's padded prompt plus everything generated so far; only
        called for criteria that read it); `scores(j)` the processed scores `(1, vocab)` of new
        token j."""
        for index, token in enumerate(new_tokens):
            if token in self.eos_ids:
                return index + 1, True
            if self.others is not None:
                before = sequence()
                prefix = torch.cat([before, before.new_tensor(new_tokens[: index + 1])])
                if bool(self.others(prefix[None], scores(index)).any()):
                    return index + 1, True
        return len(new_tokens), False


# ---------------------------------------------------------------------------------------------
# A KV cache whose rows hold different numbers of real entries
# ---------------------------------------------------------------------------------------------
class RaggedCache:
    """A `DynamicCache` shared by rows of different lengths, plus `valid (rows, columns)`: which
    cache columns hold real entries of each row (left padding and rejected drafts do not).

    Every forward appends the same number of columns to every row; the invalid ones are masked
    out through the 2-D attention mask (`attention_mask(new)`), and each row gets explicit
    position ids, so a row never sees another row's padding or its own rejected drafts.

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

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def attention_mask(self, new) -> torch.LongTensor:
        """2-D mask for a forward that appends columns: `new` is their count (all real) or their
        `(rows, count)` validity (a left-padded block)."""
        if isinstance(new, int):
            new = self.valid.new_ones(self.valid.shape[0], new)
        return torch.cat([self.valid, new.to(self.valid.device)], dim=1).long()

    def extend(self, new_valid: torch.BoolTensor) -> None:
        """Record the columns the last forward appended (which of them are real, per row)."""
        self.valid = torch.cat([self.valid, new_valid.to(self.valid.device)], dim=1)

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

    def settle(self) -> None:
        """After a round: drop columns no row uses at the end, compact if the policy says so, and
        bring sliding-window layers back to their window."""
        real_columns = self.valid.any(dim=0)
        trailing = self.length - (int(real_columns.nonzero().max()) + 1 if real_columns.any() else 0)
        self.drop_last(trailing)
        counts = self.valid.sum(dim=1)
        if self.contiguous:
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


# ---------------------------------------------------------------------------------------------
# The drafter's per-row state
# ---------------------------------------------------------------------------------------------
class BatchedFeatureMemory:
    """The target features the drafter attends to, one slot per sequence position of each row
    (slot p of row r: the target's last-layer feature at row r's own position p, padding
    excluded). Quacks like [`DreamFeatureMemory`] for `DreamDraftModel.forward`.

    Slots are written, not appended, because rows sit at different positions. A slot at or
    after a row's frontier may hold a stale value (a rejected draft's feature, or the drafter's
    own estimate); it is always rewritten before any query can read it, because a query at
    position p reads slots `< p` only.
    """

    def __init__(self, model):
        self.model = model
        self.features: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.features is None else self.features.shape[1]

    def write(self, features: torch.Tensor, start: torch.LongTensor) -> None:
        """Write `features (rows, n, hidden)` at slots `start[r] .. start[r] + n - 1` of each row."""
        features = features.to(self.model.dtype)
        rows, count, hidden = features.shape
        needed = int((start + count).max())
        keys = values = None
        if self.model.cross_block is not None:
            keys, values = self.model.cross_block.cross_attn.project_memory(features)
        if self.features is None:
            size = max(needed, MEMORY_GROWTH)
            self.features = features.new_zeros(rows, size, hidden)
            if keys is not None:
                self.keys = keys.new_zeros(rows, keys.shape[1], size, keys.shape[-1])
                self.values = values.new_zeros(rows, values.shape[1], size, values.shape[-1])
        elif needed > len(self):
            grow = max(needed - len(self), MEMORY_GROWTH)
            self.features = F.pad(self.features, (0, 0, 0, grow))
            if self.keys is not None:
                self.keys, self.values = F.pad(self.keys, (0, 0, 0, grow)), F.pad(self.values, (0, 0, 0, grow))
        slots = (start[:, None] + torch.arange(count, device=start.device)).to(features.device)
        self.features.scatter_(1, slots[..., None].expand(-1, -1, hidden), features)
        if keys is not None:
            kv_slots = slots[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
            self.keys.scatter_(2, kv_slots, keys.to(self.keys.dtype))
            self.values.scatter_(2, kv_slots, values.to(self.values.dtype))

    def select_rows(self, rows: torch.LongTensor) -> None:
        """Keep only `rows` of the features and their cross-attention keys/values (finished rows leave the batch)."""
        if self.features is None:
            return
        rows = rows.to(self.features.device)
        self.features = self.features.index_select(0, rows)
        if self.keys is not None:
            self.keys, self.values = self.keys.index_select(0, rows), self.values.index_select(0, rows)


class BatchedDrafter:
    """A [`DreamDraftModel`]'s verified state for a batch of rows: its KV cache (a
    [`RaggedCache`], rows left-padded, holes where a row caught up with fewer tokens than
    another), its [`BatchedFeatureMemory`], each row's draft length and visual-token compression
    at prefill. The batched counterpart of [`DreamCandidateGenerator`]'s `start_prefill` /
    `catch_up` / `_draft`; rows can leave the batch at any round (`select_rows`).

    While it runs, `drafter.batch_rows` lists the input batch row of every row of the drafter's
    current forward (rows leave as they finish): for debugging and for row-keyed test drafters.
    """

    def __init__(self, target, drafter, batch_size: int, device):
        self.drafter = drafter
        self.rows = list(range(batch_size))
        drafter.batch_rows = self.rows
        self.adapter = drafter.attach_target(target)
        self.cache = RaggedCache(DynamicCache(), torch.zeros(batch_size, 0, dtype=torch.bool, device=device))
        self.memory = BatchedFeatureMemory(drafter)
        self.num_draft_tokens = torch.full((batch_size,), drafter.config.num_draft_tokens, dtype=torch.long, device=device)
        # "auto" models one row's verification cost; a batch drafts num_draft_tokens per row instead
        self.adaptive = drafter.config.draft_schedule == "heuristic"
        self._recorder: AttentionInputRecorder | None = None

    # --- prefill -----------------------------------------------------------------------------
    def start_prefill(self, input_ids) -> None:
        """Call before the target's prefill: records what ranks visual tokens for compression."""
        if self.drafter.config.visual_keep_ratio < 1.0 and self.adapter.image_token_mask(input_ids).any():
            attention = self.adapter.decoder_layers[-1].self_attn
            self._recorder = AttentionInputRecorder({0: attention}).start()

    def _kept_positions(self, input_ids, prompt_mask) -> tuple[list[torch.LongTensor], list[int], list[int]]:
        """Per row: the (unpadded) prompt positions the drafter sees after visual-token
        compression, and its numbers of visual and kept visual tokens. Importance is computed on
        each row's own unpadded slice, exactly as for that prompt alone."""
        image_mask = self.adapter.image_token_mask(input_ids)
        recorded = None
        if self._recorder is not None:
            self._recorder.stop()
            recorded = self._recorder.inputs[0]
            self._recorder = None
        kept, visual, visual_kept = [], [], []
        for row in range(input_ids.shape[0]):
            real = prompt_mask[row].nonzero().squeeze(-1)
            row_images = image_mask[row, real][None]
            keep = torch.ones_like(row_images)
            if recorded is not None and row_images.any():
                hidden_states, position_embeddings = recorded
                if position_embeddings is not None:
                    position_embeddings = tuple(
                        (t[row : row + 1] if t.shape[0] > 1 else t)[:, real] for t in position_embeddings
                    )
                attention = self.adapter.decoder_layers[-1].self_attn
                importance = attention_received(attention, hidden_states[row : row + 1, real], position_embeddings)
                keep = select_visual_tokens(importance, row_images, self.drafter.config.visual_keep_ratio)
            kept.append(keep[0].nonzero().squeeze(-1))
            visual.append(int(row_images.sum()))
            visual_kept.append(int((keep & row_images).sum()))
        return kept, visual, visual_kept

    def prefill(self, input_ids, prompt_mask, prompt_embeds, features, first_tokens):
        """The drafter's first pass after the target's prefill: every row's kept prompt tokens
        (with the target's image-merged input embeddings) and its first new token, left-padded
        into one block. Returns the drafter output and the per-row visual-token counts."""
        rows, width = input_ids.shape
        prompt_lengths = prompt_mask.sum(dim=1)
        pads = width - prompt_lengths
        # memory slot p of a row = the target's feature at that row's own position p
        slots = torch.arange(int(prompt_lengths.max()), device=input_ids.device)
        index = (pads[:, None] + slots).clamp(max=width - 1)
        aligned = features.gather(1, index[..., None].expand(-1, -1, features.shape[-1]).to(features.device))
        self.memory.write(aligned, torch.zeros(rows, dtype=torch.long, device=input_ids.device))

        kept, visual, visual_kept = self._kept_positions(input_ids, prompt_mask)
        block = max(len(k) for k in kept) + 1
        embeds = prompt_embeds.new_zeros(rows, block, prompt_embeds.shape[-1])
        positions = torch.zeros(rows, block, dtype=torch.long, device=input_ids.device)
        valid = torch.zeros(rows, block, dtype=torch.bool, device=input_ids.device)
        first_embeds = self.adapter.embed(first_tokens[:, None])
        for row in range(rows):
            count = len(kept[row])
            start = block - count - 1
            embeds[row, start:-1] = prompt_embeds[row, int(pads[row]) + kept[row]]
            embeds[row, -1] = first_embeds[row, 0]
            positions[row, start:-1] = kept[row]
            positions[row, -1] = prompt_lengths[row]
            valid[row, start:] = True
        output = self.drafter(embeds, positions, memory=self.memory, attention_mask=self.cache.attention_mask(valid), cache=self.cache.cache)
        self.cache.extend(valid)
        return output, visual, visual_kept

    # --- rounds ------------------------------------------------------------------------------
    def draft(self, output, lengths, limits, logits_processor, do_sample: bool, stopper: RowStopper, prefixes, batch_size: int):
        """Draft up to `limits[r]` tokens per row, in lockstep, from `output` (the drafter's output
        whose last column is each row's last token, at position `lengths[r] - 1`).

        `prefixes()` gives each row's padded sequence (for the logits processors). A row
        stops drafting after its limit or a drafted EOS; the lockstep goes on while any row
        drafts, and the later tokens of stopped rows are ignored. Returns `(drafts (rows, k),
        processed draft scores (rows, k, vocab) when sampling, drafted count per row, drafter
        forwards run)`; the forwards left speculative columns in the drafter cache.
        """
        rows = lengths.shape[0]
        num_steps = int(limits.max()) if rows else 0
        stopped = limits <= 0
        counts = torch.zeros_like(limits)
        tokens, processed = [], []
        forwards = 0
        logits = self.drafter.to_target_vocab(output.logits[:, -1].float())
        for step in range(num_steps):
            def step_prefixes(step=step):
                drafted = torch.stack(tokens, dim=1).cpu() if tokens else None
                return [p if drafted is None else torch.cat([p, drafted[i]]) for i, p in enumerate(prefixes())]

            scores = process_rows(logits_processor, logits, step_prefixes, self.rows, batch_size)
            if do_sample:
                token = torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(-1)
            else:
                token = scores.argmax(dim=-1)
            tokens.append(token)
            processed.append(scores)
            counts += (~stopped).long()
            stopped = stopped | (counts >= limits) | stopper.is_eos(token)
            if step == num_steps - 1 or bool(stopped.all()):
                break
            # The drafted token's position sees the drafter's own feature of the previous position
            # until the target has verified it (rewritten in the next `catch_up`).
            self.memory.write(output.features[:, -1:], lengths - 1 + step)
            output = self.drafter(
                self.adapter.embed(token[:, None]),
                (lengths + step)[:, None],
                memory=self.memory,
                attention_mask=self.cache.attention_mask(1),
                cache=self.cache.cache,
            )
            self.cache.extend(torch.ones(rows, 1, dtype=torch.bool, device=lengths.device))
            forwards += 1
            logits = self.drafter.to_target_vocab(output.logits[:, -1].float())
        if not tokens:
            return lengths.new_zeros(rows, 0), None, counts, forwards
        drafts = torch.stack(tokens, dim=1)
        return drafts, (torch.stack(processed, dim=1) if do_sample else None), counts, forwards

    def catch_up(self, new_tokens: list[list[int]], starts: torch.LongTensor, features: torch.Tensor):
        """Replace the speculative state by the target's verified features and run the drafter over
        every row's new tokens (its accepted drafts and the bonus token).

        `features (rows, k + 1, hidden)` are the target's last-layer features of the verification
        pass, which covered positions `starts[r] - 1 ...` of each row (the first
        `len(new_tokens[r])` of them are now part of the sequence). Returns the drafter output;
        the block is left-padded, so its last column is every row's last token."""
        self.memory.write(features, starts - 1)
        rows = len(new_tokens)
        counts = torch.tensor([len(t) for t in new_tokens], device=starts.device)
        block = int(counts.max())
        ids = torch.zeros(rows, block, dtype=torch.long, device=starts.device)
        for row, tokens in enumerate(new_tokens):
            ids[row, block - len(tokens) :] = torch.tensor(tokens, device=starts.device)
        columns = torch.arange(block, device=starts.device)[None]
        valid = columns >= (block - counts)[:, None]
        # padding sits at position 0: it reads no memory slot, and its outputs are discarded
        positions = torch.where(valid, starts[:, None] + columns - (block - counts)[:, None], 0)
        output = self.drafter(
            self.adapter.embed(ids), positions, memory=self.memory, attention_mask=self.cache.attention_mask(valid), cache=self.cache.cache
        )
        self.cache.extend(valid)
        self.cache.settle()
        return output

    def select_rows(self, rows: torch.LongTensor) -> None:
        """Keep only `rows` (finished rows leave the batch): row ids, KV cache, feature memory and draft lengths."""
        self.rows = [self.rows[i] for i in rows.tolist()]
        self.drafter.batch_rows = self.rows
        self.cache.select_rows(rows)
        self.memory.select_rows(rows)
        self.num_draft_tokens = self.num_draft_tokens.index_select(0, rows.to(self.num_draft_tokens.device))

    def update_schedule(self, drafted: torch.LongTensor, accepted: torch.LongTensor) -> None:
        """transformers' "heuristic" schedule, per row: grow after a fully accepted draft, shrink otherwise."""
        if not self.adaptive:
            return
        drafted_rows = drafted > 0
        grown = torch.where(accepted == drafted, self.num_draft_tokens + 2, (self.num_draft_tokens - 1).clamp(min=1))
        self.num_draft_tokens = torch.where(drafted_rows, grown, self.num_draft_tokens)


# ---------------------------------------------------------------------------------------------
# Acceptance
# ---------------------------------------------------------------------------------------------
def greedy_accept(drafts: torch.LongTensor, counts: torch.LongTensor, target_scores: torch.Tensor):
    """Per row: the number of leading drafts equal to the target's argmax (at most `counts[r]`)
    and the target's token after them. `target_scores (rows, k + 1, vocab)` are processed."""
    choices = target_scores.argmax(dim=-1)
    k = drafts.shape[1]
    matches = (drafts == choices[:, :k]) & (torch.arange(k, device=drafts.device)[None] < counts[:, None])
    accepted = matches.long().cumprod(dim=1).sum(dim=1)
    bonus = choices.gather(1, accepted[:, None]).squeeze(1)
    return accepted, bonus


def speculative_accept(drafts: torch.LongTensor, counts: torch.LongTensor, target_scores: torch.Tensor, draft_scores: torch.Tensor):
    """Speculative sampling per row (Leviathan et al. / Chen et al.): draft `d_j` was sampled from
    `q_j = softmax(draft_scores[:, j])`; accept it with probability `min(1, p_j(d_j) / q_j(d_j))`
    where `p_j = softmax(target_scores[:, j])`. At the first rejection the next token is drawn from
    `max(p_j - q_j, 0)` normalised; if all of a row's `counts[r]` drafts are accepted it is drawn
    from `p` at the next position. Each new token is then distributed exactly as under `p`."""
    rows, k = drafts.shape
    p = target_scores.softmax(dim=-1)
    if k > 0:
        q = draft_scores.softmax(dim=-1)
        p_drafted = p[:, :k].gather(2, drafts[..., None]).squeeze(-1)
        q_drafted = q.gather(2, drafts[..., None]).squeeze(-1)
        keep = torch.rand(rows, k, device=p.device) <= p_drafted / q_drafted
        keep &= torch.arange(k, device=p.device)[None] < counts[:, None]
        accepted = keep.long().cumprod(dim=1).sum(dim=1)
    else:
        accepted = counts.new_zeros(rows)
    next_p = p.gather(1, accepted[:, None, None].expand(-1, 1, p.shape[-1])).squeeze(1)
    rejected = accepted < counts
    if bool(rejected.any()):
        at = accepted.clamp(max=max(k - 1, 0))
        q_at = q.gather(1, at[:, None, None].expand(-1, 1, q.shape[-1])).squeeze(1)
        next_p = torch.where(rejected[:, None], residual_distribution(next_p, q_at), next_p)
    bonus = torch.multinomial(next_p, num_samples=1).squeeze(1)
    return accepted, bonus


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`max(p - q, 0)` normalised, per row: what to sample from after rejecting a draft from `q`."""
    residual = (p - q).clamp(min=0)
    total = residual.sum(dim=-1, keepdim=True)
    # p == q up to rounding leaves nothing to redistribute: fall back to p itself
    return torch.where(total > 0, residual / total.clamp(min=torch.finfo(total.dtype).tiny), p)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------
def new_batch_stats(batch_size: int) -> dict:
    """Decoding statistics of a batched call (`drafter.last_stats`).

    Batch-level keys keep their batch-1 meaning, summed over rows:
      - `target_passes`: target forwards (prefill included), shared by all rows of a pass;
      - `drafted_tokens` / `accepted_tokens` / `new_tokens`: totals over rows;
      - `acceptance_length`: `new_tokens / row_passes`, i.e. the mean number of tokens a row
        gains per target pass it takes part in (`row_passes` sums the active rows of every pass;
        for batch size 1 this is exactly the batch-1 `acceptance_length`);
      - `tokens_per_pass`: `new_tokens / target_passes`, what the whole batch gains per forward;
      - `accepted_per_pass` / `drafted_per_pass` / `active_rows_per_pass`: per pass, summed over
        the rows that took part (`drafted_per_pass` has no entry for the prefill);
      - `visual_tokens` / `visual_tokens_kept`: totals over rows;
      - `target_cache_compactions`: how often the target's cache rows were re-packed.
    `rows[r]` holds row r's own statistics with the batch-1 keys (its passes are the ones it took
    part in), so each row reads exactly as the same prompt decoded alone would.
    """
    stats = new_stats()
    stats.update(
        batch_size=batch_size,
        row_passes=0,
        tokens_per_pass=0.0,
        active_rows_per_pass=[],
        target_cache_compactions=0,
        rows=[new_stats() for _ in range(batch_size)],
    )
    return stats


def _record_pass(stats: dict, rows: list[int], drafted: list[int], accepted: list[int], new: list[int]) -> None:
    stats["target_passes"] += 1
    stats["row_passes"] += len(rows)
    stats["active_rows_per_pass"].append(len(rows))
    first = not stats["accepted_per_pass"]
    if not first:
        stats["drafted_per_pass"].append(sum(drafted))
    stats["accepted_per_pass"].append(sum(accepted))
    for row, d, a, n in zip(rows, drafted, accepted, new):
        row_stats = stats["rows"][row]
        row_stats["target_passes"] += 1
        if not first:
            row_stats["drafted_tokens"] += d
            row_stats["drafted_per_pass"].append(d)
        row_stats["accepted_tokens"] += a
        row_stats["accepted_per_pass"].append(a)
        row_stats["new_tokens"] += n
        row_stats["acceptance_length"] = row_stats["new_tokens"] / row_stats["target_passes"]
    stats["drafted_tokens"] = sum(r["drafted_tokens"] for r in stats["rows"])
    stats["accepted_tokens"] = sum(r["accepted_tokens"] for r in stats["rows"])
    stats["new_tokens"] = sum(r["new_tokens"] for r in stats["rows"])
    stats["acceptance_length"] = stats["new_tokens"] / stats["row_passes"]
    stats["tokens_per_pass"] = stats["new_tokens"] / stats["target_passes"]


# ---------------------------------------------------------------------------------------------
# generate()
# ---------------------------------------------------------------------------------------------
def _validate(model, input_ids, generation_config, drafter) -> None:
    check_dream_call(
        model, drafter, generation_config,
        usage="`target.generate(..., assistant_model=drafter)` or `custom_generate=batched_generate, drafter=drafter`",
    )
    if input_ids.shape[1] == 0:
        raise ValueError("Batched DREAM decoding needs `input_ids` (prompts given only as `inputs_embeds` are not supported).")
    check_custom_masks(model, "Batched DREAM verification masks rejected cache entries through a 2-D attention mask with holes")


class _Streamer:
    """Feeds a streamer the way plain generate does: the prompt, then one `(batch,)` column per
    step (finished rows get the pad id), once every unfinished row has produced that column."""

    def __init__(self, streamer, pad_token_id: int):
        self.streamer, self.pad, self.sent = streamer, pad_token_id, 0

    def flush(self, generated: list[list[int]], finished: list[bool], final: bool = False) -> None:
        if self.streamer is None:
            return
        open_rows = [len(tokens) for tokens, done in zip(generated, finished) if not done]
        ready = max(len(t) for t in generated) if final or not open_rows else min(open_rows)
        for column in range(self.sent, ready):
            values = [tokens[column] if column < len(tokens) else self.pad for tokens in generated]
            self.streamer.put(torch.tensor(values))
        self.sent = max(self.sent, ready)


def _pad_scores(per_row: list[list[torch.Tensor]], steps: int, pad_token_id: int, vocab: int, device) -> tuple:
    """`(batch, vocab)` per step; a row that had already finished gets a point mass on the pad id
    (what it emitted), as `-inf` everywhere else and 0 at the pad id."""
    filler = torch.full((1, vocab), float("-inf"), device=device)
    filler[0, pad_token_id] = 0.0
    return tuple(torch.cat([row[t] if t < len(row) else filler for row in per_row]) for t in range(steps))


@torch.no_grad()
def batched_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    drafter=None,
    batched_streamer=None,
    **model_kwargs,
):
    """DREAM chain decoding for a batch of prompts, for `generate(custom_generate=...)`.

    `import hf_dream` routes `target.generate(**inputs, assistant_model=drafter)` here when the
    batch has more than one row; it can also be called as
    `target.generate(**inputs, custom_generate=batched_generate, drafter=drafter, ...)` (any batch
    size). transformers prepares the inputs (left-padded prompts, images as
    `mm_encoder_outputs`), the cache, logits processors and stopping criteria, then hands them here.

    Args:
        drafter (`DreamDraftModel`): the drafter (transformers drops `assistant_model` on this path).
        batched_streamer: where a streamer arrives (`import hf_dream` forwards `generate(streamer=...)`
            here, since transformers does not hand `streamer` to a `custom_generate` callable); it
            gets the prompt, then `(batch,)` columns like plain generate, then `end()`.

    Returns:
        The sequences `(batch, prompt + new)` exactly as plain generate lays them out (the padded
        prompt, then each row's tokens, rows that finished early padded with `pad_token_id`), or a
        `GenerateDecoderOnlyOutput` with `return_dict_in_generate=True` (`scores` / `logits` when
        asked; steps after a row finished hold a point mass on the pad id; no cache, since rows
        leave the target cache as they finish). Statistics are in `drafter.last_stats`
        (see [`new_batch_stats`]).
    """
    _validate(model, input_ids, generation_config, drafter)
    device = model.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    batch, width = input_ids.shape
    do_sample = bool(generation_config.do_sample)
    stopper = RowStopper(stopping_criteria, generation_config, width)
    pad_token_id = generation_config._pad_token_tensor
    if pad_token_id is None:
        pad_token_id = next(iter(sorted(stopper.eos_ids)), 0)
    pad_token_id = int(pad_token_id.reshape(-1)[0]) if torch.is_tensor(pad_token_id) else int(pad_token_id)
    want_scores = generation_config.return_dict_in_generate and generation_config.output_scores
    want_logits = generation_config.return_dict_in_generate and generation_config.output_logits
    stream = _Streamer(batched_streamer, pad_token_id)
    if batched_streamer is not None:
        batched_streamer.put(input_ids.cpu())

    mask = model_kwargs.get("attention_mask")
    prompt_mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.to(device).bool()
    prompt_lengths = prompt_mask.sum(dim=1)
    # explicit position ids (from generate, or the user) may be offset from the unpadded index
    position_ids = model_kwargs.get("position_ids")
    offsets = torch.zeros_like(prompt_lengths) if position_ids is None else position_ids[:, -1].to(device) + 1 - prompt_lengths

    state = BatchedDrafter(model, drafter, batch, device)
    stats = new_batch_stats(batch)
    drafter.last_stats = stats
    last_layer = state.adapter.num_hidden_layers
    prompt_rows = input_ids.cpu()
    generated: list[list[int]] = [[] for _ in range(batch)]
    row_scores: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    row_logits: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    finished = [False] * batch

    def sequence(row: int) -> torch.Tensor:
        """Row's padded prompt plus its tokens so far: what plain generate shows the processors."""
        return torch.cat([prompt_rows[row], torch.tensor(generated[row], dtype=torch.long)])

    # --- prefill: a plain target step that also gives the drafter every prompt's features ----
    state.start_prefill(input_ids)
    outputs = _prefill(model, input_ids, model_kwargs, [0, last_layer])
    cache = outputs.cache if getattr(outputs, "cache", None) is not None else model_kwargs["cache"]
    check_compactable(cache)
    sliding = any(isinstance(layer, DynamicSlidingWindowLayer) for layer in cache.layers)
    if sliding:
        cache.activate_past_recording()  # a verification pass must not evict entries a row still needs
    target_cache = RaggedCache(cache, prompt_mask.clone(), contiguous=sliding)
    raw = outputs.logits[:, -1].float()
    scores = logits_processor(input_ids, raw)
    first = torch.multinomial(scores.softmax(dim=-1), 1).squeeze(1) if do_sample else scores.argmax(dim=-1)
    for row, token in enumerate(first.tolist()):
        _, done = stopper.cut(lambda row=row: prompt_rows[row], [token], lambda j, row=row: scores[row : row + 1])
        generated[row].append(token)
        if want_scores:
            row_scores[row].append(scores[row : row + 1])
        if want_logits:
            row_logits[row].append(raw[row : row + 1])
        finished[row] = done or stopper.max_new_tokens <= 1
    _record_pass(stats, list(range(batch)), [0] * batch, [0] * batch, [1] * batch)
    stream.flush(generated, finished)

    active = [row for row in range(batch) if not finished[row]]
    output = None
    if active:
        rows = torch.tensor(active, device=device)
        output, visual, visual_kept = state.prefill(
            input_ids, prompt_mask, outputs.hidden_states[0], outputs.hidden_states[last_layer], first
        )
        for row in range(batch):
            stats["rows"][row]["visual_tokens"] = visual[row]
            stats["rows"][row]["visual_tokens_kept"] = visual_kept[row]
        stats["visual_tokens"], stats["visual_tokens_kept"] = sum(visual), sum(visual_kept)
        if len(active) < batch:
            target_cache.select_rows(rows)
            state.select_rows(rows)
            output = _select_output(output, rows)
            target_cache.settle()
    del outputs

    lengths = (prompt_lengths + 1)[torch.tensor(active, dtype=torch.long, device=device)] if active else None
    offsets = offsets[torch.tensor(active, dtype=torch.long, device=device)] if active else None
    while active:
        n_active = len(active)
        num_generated = torch.tensor([len(generated[row]) for row in active], device=device)
        # never draft past the row's budget: the verification pass adds one token itself
        limits = torch.minimum(state.num_draft_tokens, stopper.max_new_tokens - num_generated - 1).clamp(min=0)
        prefixes = _Lazy(lambda active=active: [sequence(row) for row in active])  # only if a processor reads them
        drafts, draft_scores, counts, forwards = state.draft(
            output, lengths, limits, logits_processor, do_sample, stopper, prefixes, batch
        )
        k = drafts.shape[1]

        # --- verification: one target pass over [last token, drafts] of every row ------------
        last_tokens = torch.tensor([generated[row][-1] for row in active], device=device)
        verify_ids = torch.cat([last_tokens[:, None], drafts], dim=1)
        positions = (lengths - 1 + offsets)[:, None] + torch.arange(k + 1, device=device)
        verification = model(
            input_ids=verify_ids,
            attention_mask=target_cache.attention_mask(k + 1),
            position_ids=positions,
            cache=cache,
            use_cache=True,
            output_hidden_states=[last_layer],
            return_dict=True,
        )
        raw = verification.logits.float()
        vocab = raw.shape[-1]
        drafts_cpu = drafts.cpu()

        def verify_prefixes(prefixes=prefixes, drafts=drafts_cpu, k=k):
            return [torch.cat([prefix, drafts[i, :j]]) for i, prefix in enumerate(prefixes()) for j in range(k + 1)]

        score_rows = [row for row in active for _ in range(k + 1)]
        target_scores = process_rows(logits_processor, raw.reshape(-1, vocab), verify_prefixes, score_rows, batch)
        target_scores = target_scores.reshape(n_active, k + 1, vocab)
        if do_sample:
            accepted, bonus = speculative_accept(drafts, counts, target_scores, draft_scores)
        else:
            accepted, bonus = greedy_accept(drafts, counts, target_scores)

        # --- per-row bookkeeping ---------------------------------------------------------------
        accepted_list, bonus_list, counts_list = accepted.tolist(), bonus.tolist(), counts.tolist()
        new_tokens, kept_counts, still_active = [], [], []
        for i, row in enumerate(active):
            proposed = drafts_cpu[i, : accepted_list[i]].tolist() + [bonus_list[i]]
            budget = stopper.max_new_tokens - len(generated[row])
            proposed = proposed[:budget]
            kept, done = stopper.cut(
                lambda row=row: sequence(row), proposed, lambda j, i=i, scores=target_scores: scores[i, j : j + 1]
            )
            done = done or len(generated[row]) + kept >= stopper.max_new_tokens
            tokens = proposed[:kept]
            generated[row].extend(tokens)
            if want_scores:
                row_scores[row].extend(target_scores[i, j : j + 1] for j in range(kept))
            if want_logits:
                row_logits[row].extend(raw[i, j : j + 1] for j in range(kept))
            finished[row] = done
            new_tokens.append(tokens)
            kept_counts.append(kept)
            if not done:
                still_active.append(i)
        _record_pass(stats, active, counts_list, [c - 1 for c in kept_counts], kept_counts)
        state.update_schedule(counts, torch.tensor([c - 1 for c in kept_counts], device=device))
        stream.flush(generated, finished)

        # the target cache keeps [last token, accepted drafts] of every row
        target_cache.extend(torch.arange(k + 1, device=device)[None] <= accepted[:, None])
        state.cache.drop_last(forwards)  # the drafter's speculative columns
        if not still_active:
            break
        if len(still_active) < n_active:
            keep = torch.tensor(still_active, device=device)
            target_cache.select_rows(keep)
            state.select_rows(keep)
        else:
            keep = None
        target_cache.settle()

        # --- the drafter catches up with the target's features of the accepted tokens ----------
        features = verification.hidden_states[last_layer]
        starts = lengths
        if keep is not None:
            features, starts, offsets = features[keep], starts[keep], offsets[keep]
        active = [active[i] for i in still_active]
        output = state.catch_up([new_tokens[i] for i in still_active], starts, features)
        lengths = starts + torch.tensor([len(new_tokens[i]) for i in still_active], device=device)
        del verification

    stream.flush(generated, finished, final=True)
    stats["target_cache_compactions"] = target_cache.compactions
    drafter.batch_rows = None
    if batched_streamer is not None:
        batched_streamer.end()
    steps = max(len(tokens) for tokens in generated)
    sequences = torch.full((batch, width + steps), pad_token_id, dtype=torch.long, device=device)
    sequences[:, :width] = input_ids
    for row, tokens in enumerate(generated):
        sequences[row, width : width + len(tokens)] = torch.tensor(tokens, device=device)
    if generation_config.return_dict_in_generate:
        vocab = next(t.shape[-1] for per_row in row_scores + row_logits for t in per_row)
        return GenerateDecoderOnlyOutput(
            sequences=sequences,
            scores=_pad_scores(row_scores, steps, pad_token_id, vocab, device) if want_scores else None,
            logits=_pad_scores(row_logits, steps, pad_token_id, vocab, device) if want_logits else None,
        )
    return sequences


class _Lazy:
    """A value computed on first call, then remembered."""

    def __init__(self, compute):
        self.compute, self.value, self.done = compute, None, False

    def __call__(self):
        if not self.done:
            self.value, self.done = self.compute(), True
        return self.value


def _select_output(output, rows: torch.LongTensor):
    """The drafter output's rows `rows` (logits and features are all drafting needs)."""
    output.logits = output.logits.index_select(0, rows.to(output.logits.device))
    output.features = output.features.index_select(0, rows.to(output.features.device))
    return output
