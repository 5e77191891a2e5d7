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

from .drafter_state import DrafterState
from .kv_cache import RaggedCache, check_compactable
from .stats import DecodingStats
from .tree import _prefill
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

    state = DrafterState(model, drafter, batch, device)
    stats = DecodingStats.new(batch, batched=True)
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
    stats.record_pass(None)
    stats.record_acceptance([0] * batch, [1] * batch)
    stream.flush(generated, finished)

    active = [row for row in range(batch) if not finished[row]]
    output = None
    if active:
        rows = torch.tensor(active, device=device)
        output = state.prefill(input_ids, prompt_mask, outputs.hidden_states[0], outputs.hidden_states[last_layer], first)
        stats.record_visual(state)
        if len(active) < batch:
            target_cache.select_rows(rows)
            state.select_rows(rows)
            output = _select_output(output, rows)
            target_cache.settle()
    del outputs

    offsets = offsets[torch.tensor(active, dtype=torch.long, device=device)] if active else None
    while active:
        n_active = len(active)
        num_generated = torch.tensor([len(generated[row]) for row in active], device=device)
        # never draft past the row's budget: the verification pass adds one token itself
        limits = torch.minimum(state.schedule.next_lengths(state), stopper.max_new_tokens - num_generated - 1).clamp(min=0)
        prefixes = _Lazy(lambda active=active: [sequence(row) for row in active])  # only if a processor reads them

        def process(logits, tokens, prefixes=prefixes):
            def step_prefixes():
                drafted = torch.stack(tokens, dim=1).cpu() if tokens else None
                return [p if drafted is None else torch.cat([p, drafted[i]]) for i, p in enumerate(prefixes())]

            return process_rows(logits_processor, logits, step_prefixes, state.rows, batch)

        draft = state.draft_chain(output, limits, process, do_sample, stopper.is_eos)
        drafts, draft_scores, counts = draft.tokens, draft.scores, draft.counts
        lengths = state.lengths
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
        stats.record_pass(counts_list, active)
        stats.record_acceptance([c - 1 for c in kept_counts], kept_counts, active)
        state.schedule.record(counts, torch.tensor([c - 1 for c in kept_counts], device=device))
        stream.flush(generated, finished)

        # the target cache keeps [last token, accepted drafts] of every row
        target_cache.extend(torch.arange(k + 1, device=device)[None] <= accepted[:, None])
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
        if keep is not None:
            features, offsets = features[keep], offsets[keep]
        active = [active[i] for i in still_active]
        output = state.catch_up([new_tokens[i] for i in still_active], features)
        del verification

    stream.flush(generated, finished, final=True)
    stats.target_cache_compactions = target_cache.compactions
    stats.publish(drafter)
    state.close()
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
