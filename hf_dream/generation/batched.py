"""Batched DREAM chain decoding (batch size > 1), lossless per row.

transformers' assisted-decoding loop handles one sequence only, so batches run through this
`custom_generate` loop instead. After `import hf_dream`, a DREAM `assistant_model` with a batch
of more than one prompt is routed here automatically:

```python
out = target.generate(**batched_inputs, assistant_model=drafter, max_new_tokens=64)
# the same as
out = target.generate(**batched_inputs, custom_generate=batched_generate, drafter=drafter, max_new_tokens=64)
```

Each round drafts up to `k` tokens per row (`num_draft_tokens`, cut to the row's remaining
budget, stopped after a drafted EOS), all rows in lockstep, then runs the shared engine
(`hf_dream.generation.engine`: one verification pass, per-row acceptance of each chain as a
width-1 tree, stopping, cache compaction, statistics, output), so every row's output is
distributed exactly as plain sampling and greedy output is token-identical to plain greedy
decoding.

Rows are independent: the drafter indexes its feature memory by each row's own (unpadded)
sequence position, so a row drafts exactly what it would draft alone.
"""

from __future__ import annotations

import torch

from .engine import speculative_generate
from .options import resolve_options
from .validation import check_dream_call


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
    tokenizer=None,
    decoding_options=None,
    num_draft_tokens=None,
    draft_schedule=None,
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
        tokenizer: only read by transformers, to build the `stop_strings` criterion (`import hf_dream`
            keeps it for this loop, which transformers would otherwise drop).
        decoding_options (`DreamDecodingOptions`, *optional*): this call's options instead of
            `drafter.decoding_options`; `num_draft_tokens` and `draft_schedule` override single fields
            (see [`DreamDecodingOptions`]).

    Returns:
        The sequences `(batch, prompt + new)` exactly as plain generate lays them out (the padded
        prompt, then each row's tokens, rows that finished early padded with `pad_token_id`), or a
        `GenerateDecoderOnlyOutput` with `return_dict_in_generate=True` (`scores` / `logits` when
        asked; steps after a row finished hold a point mass on the pad id; no cache for a batch of
        more than one, since rows leave the target cache as they finish). Statistics are in
        `drafter.last_stats` (see [`DecodingStats`]).
    """
    options = resolve_options(drafter, decoding_options, num_draft_tokens=num_draft_tokens, draft_schedule=draft_schedule)
    check_dream_call(
        model, drafter, generation_config,
        usage="`target.generate(..., assistant_model=drafter)` or `custom_generate=batched_generate, drafter=drafter`",
        custom_mask="Batched DREAM verification masks rejected cache entries through a 2-D attention mask with holes",
    )
    return speculative_generate(
        model, input_ids, logits_processor, stopping_criteria, generation_config, drafter, model_kwargs,
        streamer=batched_streamer if batched_streamer is not None else streamer, options=options,
    )
