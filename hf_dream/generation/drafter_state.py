"""The drafter side of DREAM decoding, one state for every mode (the `assistant_model=` chain,
trees, batches): the drafter's KV cache, its feature memory, prefill with visual-token
compression, catch-up with the target's verified features, chain drafting, and the draft-length
schedule. Rows can leave the batch at any round (`select_rows`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..features import AttentionInputRecorder, attention_received, select_visual_tokens
from ..targets import TargetPositions
from .cost_model import DraftLengthChooser
from .kv_cache import RaggedCache
from .options import CALL_INPUTS, DreamDecodingOptions, drafter_options


@dataclass
class ChainDraft:
    """Chain drafts of a batch: `tokens (rows, k)` (a row's tokens after `counts[r]` are lockstep
    filler), the processed draft scores `(rows, k, vocab)` they were sampled from (sampling only)."""

    tokens: torch.LongTensor
    scores: torch.Tensor | None
    counts: torch.LongTensor


class DraftSchedule:
    """Tokens to draft per row and round, from this call's [`DreamDecodingOptions`]:
    `draft_schedule="constant"`, `"heuristic"` (transformers' assistant schedule, per row) or `"auto"`
    (the cost model of `cost_model`; batch 1 only, since it models one row's verification cost:
    batches draft `num_draft_tokens`)."""

    def __init__(self, target, drafter, batch_size: int, device, options: DreamDecodingOptions):
        self.lengths = torch.full((batch_size,), options.num_draft_tokens, dtype=torch.long, device=device)
        self.heuristic = options.draft_schedule == "heuristic"
        auto = options.draft_schedule == "auto" and batch_size == 1
        self.chooser = DraftLengthChooser(target, drafter) if auto else None

    def next_lengths(self, state: DrafterState) -> torch.LongTensor:
        """`(rows,)` tokens to draft this round (`"auto"` times the costs on its first call)."""
        if self.chooser is not None:
            if self.chooser.costs is None:
                self.chooser.measure(state, int(state.lengths[0]))
            self.lengths.fill_(self.chooser.next_length())
        return self.lengths

    def record(self, drafted: torch.LongTensor, accepted: torch.LongTensor) -> None:
        """After a verified round: rows that drafted grow after a full acceptance, shrink otherwise."""
        if self.chooser is not None:
            self.chooser.record(int(drafted[0]), int(accepted[0]))
        if self.heuristic:
            grown = torch.where(accepted == drafted, self.lengths + 2, (self.lengths - 1).clamp(min=1))
            self.lengths = torch.where(drafted > 0, grown, self.lengths)

    def select_rows(self, rows: torch.LongTensor) -> None:
        """Keep only `rows` (finished rows leave the batch)."""
        self.lengths = self.lengths.index_select(0, rows.to(self.lengths.device))


class DrafterState:
    """A [`DreamDraftModel`]'s decoding state for a batch of rows: its KV cache (a [`RaggedCache`],
    rows left-padded, holes where a row caught up with fewer tokens than another), its
    [`DreamFeatureMemory`] (slot p of a row: the target's feature at the row's own position p),
    `lengths[r]` (row r's sequence length the drafter has run over) and each row's visual-token
    compression at prefill.

    Positions: every drafter forward takes two. The row's own (unpadded) sequence index orders the
    drafter's cache and indexes the feature memory; the target's [`TargetPositions`] (`positions`,
    set at prefill) feed the drafter's rotary embedding: the prompt's own position ids for the
    prompt tokens it keeps (original positions, never shifted by the tokens compression dropped),
    `index + deltas` for every later token (drafts, tree nodes, catch-up), exactly the positions the
    target verifies them at ([`verify_positions`]).

    With `track_rows`, `drafter.batch_rows` lists the input batch row of every row of the drafter's
    current forward (for row-keyed test drafters). `options`: this call's [`DreamDecodingOptions`]
    (default: the drafter's own, `drafter.decoding_options`).
    """

    def __init__(self, target, drafter, batch_size: int, device, track_rows: bool = True, options: DreamDecodingOptions | None = None):
        self.drafter = drafter
        self.options = drafter_options(drafter) if options is None else options
        self.adapter = drafter.attach_target(target)
        self.rows = list(range(batch_size))
        self.track_rows = track_rows
        self.cache = RaggedCache(DynamicCache(), torch.zeros(batch_size, 0, dtype=torch.bool, device=device))
        self.memory = drafter.new_memory()
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.schedule = DraftSchedule(target, drafter, batch_size, device, self.options)
        self.speculative_columns = 0  # drafter cache columns of unverified drafts, dropped at catch-up
        self.visual_tokens = [0] * batch_size
        self.visual_tokens_kept = [0] * batch_size
        self.positions: TargetPositions | None = None
        self._recorder: AttentionInputRecorder | None = None

    def forward(self, embeds, positions, valid=None, memory=None, cache: RaggedCache | None = None, rows=None, rotary=None):
        """One drafter forward appending `embeds`' columns (`valid (rows, n)`: which are real) to `cache`.

        `positions (rows, n)`: sequence indices; `rotary (axes, rows, n)`: the target's positions of
        the columns (default: those of tokens after the prompt, `positions + deltas`)."""
        cache = self.cache if cache is None else cache
        if valid is None:
            valid = embeds.shape[1]
        if self.track_rows:
            self.drafter.batch_rows = self.rows if rows is None else rows
        memory = self.memory if memory is None else memory
        if rotary is None:
            rotary = self.positions.after_prompt(positions)
        output = self.drafter(
            embeds, positions, memory=memory, attention_mask=cache.attention_mask(valid), cache=cache.cache, rotary_position_ids=rotary
        )
        cache.extend(valid)
        return output

    def verify_positions(self, depths: torch.LongTensor) -> torch.LongTensor:
        """`(axes, rows, n)`: the target's positions of nodes at `depths (rows, n)` below every row's
        last token (sequence index `lengths - 1`), where a verification pass places them."""
        return self.positions.after_prompt((self.lengths - 1)[:, None] + depths.to(self.lengths.device))

    def close(self) -> None:
        """End of decoding, successful or not: no hook stays on the target (a prefill that raised
        never stopped its recorder), no row-keyed read-out on the drafter. Idempotent."""
        if self._recorder is not None:
            self._recorder.stop()
            self._recorder = None
        if self.track_rows:
            self.drafter.batch_rows = None

    # --- prefill -----------------------------------------------------------------------------
    def prompt_view(self, input_ids, prompt_mask, hidden_states) -> tuple[torch.Tensor, torch.Tensor]:
        """What the drafter reads of the prompt, for [`prefill`]: the image-merged input embeddings and the
        (fused) target features of the target's prefill `hidden_states`, or with `drafter_image="blank"`
        those of a target pass over the same prompt with its images blanked (the inputs of this `generate()`
        call, `CALL_INPUTS`). Call it before `prefill`: with compression the visual tokens are then ranked on
        the pass the drafter reads."""
        if self.options.drafter_image == "blank":
            call_inputs = CALL_INPUTS.get()
            if call_inputs is None:
                raise RuntimeError('drafter_image="blank" needs the inputs of the generate() call: decode through target.generate(...).')
            hidden_states = blank_image_hidden_states(self.adapter, input_ids, prompt_mask, call_inputs)
        return hidden_states[0], self.drafter.fuse_target_features(hidden_states)

    def start_prefill(self, input_ids) -> None:
        """Call before the target's prefill: records what ranks visual tokens for compression
        (this thread's forwards only; `close()` removes the hook if the prefill fails)."""
        if self.drafter.config.visual_keep_ratio < 1.0 and self.adapter.image_token_mask(input_ids).any():
            attention = self.adapter.decoder_layers[-1].self_attn
            self._recorder = AttentionInputRecorder({0: attention}).start()

    def _kept_positions(self, input_ids, prompt_mask) -> list[torch.LongTensor]:
        """Per row: the (unpadded) prompt positions the drafter sees after visual-token
        compression. Importance is computed on each row's own unpadded slice, exactly as for that
        prompt alone."""
        image_mask = self.adapter.image_token_mask(input_ids)
        recorded = None
        if self._recorder is not None:
            self._recorder.stop()
            recorded = self._recorder.inputs[0]
            self._recorder = None
        kept = []
        for row in range(input_ids.shape[0]):
            real = prompt_mask[row].nonzero().squeeze(-1)
            row_images = image_mask[row, real][None]
            keep = torch.ones_like(row_images)
            if recorded is not None and row_images.any():
                hidden_states, position_embeddings = recorded
                if position_embeddings is not None:
                    position_embeddings = tuple((t[row : row + 1] if t.shape[0] > 1 else t)[:, real] for t in position_embeddings)
                attention = self.adapter.decoder_layers[-1].self_attn
                importance = attention_received(attention, hidden_states[row : row + 1, real], position_embeddings)
                keep = select_visual_tokens(importance, row_images, self.drafter.config.visual_keep_ratio)
            kept.append(keep[0].nonzero().squeeze(-1))
            self.visual_tokens[row] = int(row_images.sum())
            self.visual_tokens_kept[row] = int((keep & row_images).sum())
        return kept

    def prefill(self, input_ids, prompt_mask, prompt_embeds, features, first_tokens, positions: TargetPositions):
        """The drafter's first pass after the target's prefill: every row's kept prompt tokens
        (with the target's image-merged input embeddings `prompt_embeds`, and the target's
        last-layer `features` of every prompt position in memory) and its first new token,
        left-padded into one block, at the target's `positions`. Returns the drafter output (last
        column: each row's token)."""
        self.positions = positions
        rows, width = input_ids.shape
        prompt_lengths = prompt_mask.sum(dim=1)
        pads = width - prompt_lengths
        # memory slot p of a row = the target's feature at that row's own position p
        slots = torch.arange(int(prompt_lengths.max()), device=input_ids.device)
        index = (pads[:, None] + slots).clamp(max=width - 1)
        aligned = features.gather(1, index[..., None].expand(-1, -1, features.shape[-1]).to(features.device))
        self.memory.write(aligned, 0)

        kept = self._kept_positions(input_ids, prompt_mask)
        block = max(len(k) for k in kept) + 1
        embeds = prompt_embeds.new_zeros(rows, block, prompt_embeds.shape[-1])
        positions = torch.zeros(rows, block, dtype=torch.long, device=input_ids.device)
        rotary = torch.zeros(self.positions.axes, rows, block, dtype=torch.long, device=input_ids.device)
        valid = torch.zeros(rows, block, dtype=torch.bool, device=input_ids.device)
        first_embeds = self.adapter.embed(first_tokens.reshape(rows, 1))
        for row in range(rows):
            start = block - len(kept[row]) - 1
            embeds[row, start:-1] = prompt_embeds[row, int(pads[row]) + kept[row]]
            embeds[row, -1] = first_embeds[row, 0]
            positions[row, start:-1] = kept[row]
            positions[row, -1] = prompt_lengths[row]
            # kept prompt tokens at their original positions, the first new token after the prompt
            rotary[:, row, start:-1] = self.positions.prompt[:, row, int(pads[row]) + kept[row].to(self.positions.prompt.device)]
            rotary[:, row, -1] = self.positions.after_prompt(prompt_lengths[row].reshape(1, 1), row)[:, 0, 0]
            valid[row, start:] = True
        self.lengths = prompt_lengths + 1
        return self.forward(embeds, positions, valid, rotary=rotary)

    # --- rounds ------------------------------------------------------------------------------
    def draft_chain(self, output, limits, process, do_sample: bool, is_eos) -> ChainDraft:
        """Draft up to `limits[r]` tokens per row, in lockstep, from `output` (the drafter's output
        whose last column is each row's last token, at position `lengths[r] - 1`).

        `process(logits (rows, vocab), drafted)` applies the target's logits processors, given the
        tokens drafted so far (a list of `(rows,)` tensors); `is_eos(tokens)` marks EOS ids. A row
        stops after its limit or a drafted EOS; the lockstep goes on while any row drafts. The
        forwards leave speculative columns in the drafter cache, dropped at the next `catch_up`.
        """
        rows = self.lengths.shape[0]
        num_steps = int(limits.max()) if rows else 0
        stopped = limits <= 0
        counts = torch.zeros_like(limits)
        tokens, processed = [], []
        logits = self.drafter.to_target_vocab(output.logits[:, -1].float())
        for step in range(num_steps):
            scores = process(logits, tokens)
            token = torch.multinomial(scores.softmax(dim=-1), 1).squeeze(-1) if do_sample else scores.argmax(dim=-1)
            tokens.append(token)
            processed.append(scores)
            counts += (~stopped).long()
            stopped = stopped | (counts >= limits) | is_eos(token)
            if step == num_steps - 1 or bool(stopped.all()):
                break
            # The drafted token's position sees the drafter's own feature of the previous position
            # until the target has verified it (rewritten in the next `catch_up`).
            self.memory.write(output.features[:, -1:], self.lengths - 1 + step)
            output = self.forward(self.adapter.embed(token[:, None]), (self.lengths + step)[:, None])
            self.speculative_columns += 1
            logits = self.drafter.to_target_vocab(output.logits[:, -1].float())
        if not tokens:
            return ChainDraft(self.lengths.new_zeros(rows, 0), None, counts)
        return ChainDraft(torch.stack(tokens, dim=1), torch.stack(processed, dim=1) if do_sample else None, counts)

    def catch_up(self, new_tokens: list[list[int]], features: torch.Tensor):
        """Replace the speculative state by the target's verified features and run the drafter over
        every row's new tokens (its accepted drafts and the bonus token).

        `features (rows, n, hidden)` are the target's last-layer features of the verification
        pass, whose first `len(new_tokens[r])` entries are row r's positions `lengths[r] - 1 ...`,
        now part of the sequence (later entries are ignored). Returns the drafter output; the block
        is left-padded, so its last column is every row's last token."""
        self.cache.drop_last(self.speculative_columns)
        self.speculative_columns = 0
        self.memory.write(features, self.lengths - 1)
        device = self.lengths.device
        rows = len(new_tokens)
        counts = torch.tensor([len(t) for t in new_tokens], device=device)
        block = int(counts.max())
        ids = torch.zeros(rows, block, dtype=torch.long, device=device)
        for row, tokens in enumerate(new_tokens):
            ids[row, block - len(tokens) :] = torch.tensor(tokens, device=device)
        columns = torch.arange(block, device=device)[None]
        valid = columns >= (block - counts)[:, None]
        # padding sits at position 0: it reads no memory slot, and its outputs are discarded
        positions = torch.where(valid, self.lengths[:, None] + columns - (block - counts)[:, None], 0)
        output = self.forward(self.adapter.embed(ids), positions, valid)
        self.lengths = self.lengths + counts
        self.cache.settle()
        return output

    def select_rows(self, rows: torch.LongTensor) -> None:
        """Keep only `rows` (finished rows leave the batch): row ids, KV cache, memory, lengths, schedule."""
        self.rows = [self.rows[i] for i in rows.tolist()]
        self.cache.select_rows(rows)
        self.memory.select_rows(rows)
        self.lengths = self.lengths.index_select(0, rows.to(self.lengths.device))
        self.positions = self.positions.select_rows(rows)
        self.schedule.select_rows(rows)


# inputs a prompt-only pass leaves out: the prompt ids (given apart), the decoding cache and what the loop sets per pass
_NOT_PROMPT_INPUTS = ("input_ids", "inputs", "past_key_values", "cache", "cache_position", "use_cache", "position_ids", "inputs_embeds",
                      "output_hidden_states", "output_attentions", "return_dict", "logits_to_keep")


@torch.no_grad()
def blank_image_hidden_states(adapter, input_ids, prompt_mask, prompt_kwargs: dict) -> tuple[torch.Tensor, ...]:
    """Every hidden state of the target (`adapter.model`) over the prompt `input_ids` with its images blanked
    (`prompt_kwargs`: the call's model inputs, every `pixel_values*` among them blanked by
    `adapter.blank_pixel_values`; image sizes, grids and token types unchanged), without a cache."""
    model = adapter.model
    width = input_ids.shape[1]
    inputs = {}
    for key, value in prompt_kwargs.items():
        if key in _NOT_PROMPT_INPUTS or value is None:
            continue
        if key.startswith("pixel_values") and torch.is_tensor(value):
            value = adapter.blank_pixel_values(value)
        elif key in adapter.token_type_keys and torch.is_tensor(value):
            value = value[:, :width]
        inputs[key] = value
    inputs["attention_mask"] = prompt_mask.long()
    inputs = model.prepare_inputs_for_generation(input_ids, is_first_iteration=True, use_cache=False, **inputs)
    inputs.update(output_hidden_states=True, use_cache=False, return_dict=True)
    inputs.pop("past_key_values", None)
    return model(**inputs).hidden_states
