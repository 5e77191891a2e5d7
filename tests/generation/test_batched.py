"""What only batched chain decoding has: a constant draft length under `draft_schedule="auto"`,
a drafter network that computes for every row what it computes for that prompt alone, a batch
of one equal to chain decoding, and the ragged cache's compaction (the mode-independent
guarantees are in test_contract.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_drafter, cached_target
from test_contract import assert_rows_match, check_row_stats, mode_oracle, new_tokens_alone, ragged_rows

from hf_dream import DreamDraftModel
from hf_dream.generation.batched import batched_generate
from hf_dream.generation.kv_cache import RaggedCache
from hf_dream.testing import make_tiny_inputs, stack_tiny_inputs

NEW_TOKENS = 30


def check_untrained_drafter(target, fusion, **overrides):
    rows = ragged_rows(target)
    batch = stack_tiny_inputs(target, rows)
    greedy = dict(max_new_tokens=20, do_sample=False)
    alone = new_tokens_alone(target, rows, **greedy)
    torch.manual_seed(0)
    drafter = DreamDraftModel.from_target(target, fusion=fusion, **overrides)
    output = target.generate(**batch, **greedy, assistant_model=drafter)
    assert_rows_match(output, batch["input_ids"].shape[1], alone, target.tiny_spec.pad_token_id)
    check_row_stats(drafter.last_stats, [len(t) for t in alone])
    return drafter


def test_auto_draft_schedule_drafts_a_constant_length_in_batches():
    """`draft_schedule="auto"` sizes batch-1 chains; a batch drafts `num_draft_tokens` per row and stays exact."""
    drafter = check_untrained_drafter(cached_target("llava"), "cross_attention", draft_schedule="auto", num_draft_tokens=3)
    assert {d for row in drafter.last_stats["rows"] for d in row["drafted_per_pass"]} <= {0, 1, 2, 3}
    assert max(d for row in drafter.last_stats["rows"] for d in row["drafted_per_pass"]) == 3


class RecordingDraftModel(DreamDraftModel):
    """A real drafter that records its logits at every (input batch row, position) it runs,
    later runs overwriting earlier ones (position 0 is skipped: batched padding uses it)."""

    row: int = 0

    def forward(self, inputs_embeds, position_ids, *args, **kwargs):
        output = super().forward(inputs_embeds, position_ids, *args, **kwargs)
        rows = self.batch_rows if self.batch_rows is not None else [self.row] * position_ids.shape[0]
        for index, positions in enumerate(position_ids.tolist()):
            for column, position in enumerate(positions):
                if position > 0:
                    self.seen[(rows[index], position)] = output.logits[index, column].clone()
        return output


@pytest.mark.parametrize("family, fusion", [("llava", "cross_attention"), ("idefics3", "cross_attention"), ("gemma3", "concat")])
def test_batched_drafter_computes_what_it_computes_alone(family, fusion):
    """The drafter network itself (its cache, per-row feature memory, per-row visual-token
    compression) gives every row the logits it gives that prompt alone, at every position."""
    target = cached_target(family)
    rows = ragged_rows(target)
    torch.manual_seed(0)
    drafter = build_drafter(RecordingDraftModel, target, fusion=fusion, num_draft_tokens=3)
    drafter.attach_target(target)
    if drafter.cross_block is not None:
        with torch.no_grad():  # an untrained block is the identity: open it so the memory matters
            drafter.cross_block.attn_gate.fill_(1.0)
    greedy = dict(max_new_tokens=16, do_sample=False)
    alone = {}
    for r, row in enumerate(rows):
        drafter.seen, drafter.row = {}, r
        target.generate(**row, **greedy, assistant_model=drafter)
        alone.update(drafter.seen)
    drafter.seen = {}
    target.generate(**stack_tiny_inputs(target, rows), **greedy, assistant_model=drafter)
    # (the batch may run a few more positions: rows that stopped drafting still take part in the
    # lockstep draft forwards, whose outputs are ignored)
    assert alone.keys() <= drafter.seen.keys()
    for key, logits in alone.items():
        torch.testing.assert_close(drafter.seen[key], logits, atol=2e-4, rtol=1e-4, msg=f"row, position {key}")


def test_batch_of_one_through_batched_generate_matches_chain_decoding():
    target = cached_target("idefics3")
    inputs = make_tiny_inputs(target, seed=1)
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    reference = target.generate(**inputs, **greedy)
    drafter = mode_oracle(target, {0: reference[0]})
    chain = target.generate(**inputs, **greedy, assistant_model=drafter)
    chain_stats = dict(drafter.last_stats)
    output = target.generate(**inputs, **greedy, custom_generate=batched_generate, drafter=drafter)
    assert torch.equal(output, reference) and torch.equal(chain, reference)
    row = drafter.last_stats["rows"][0]
    for key in ("target_passes", "accepted_per_pass", "drafted_per_pass", "acceptance_length", "visual_tokens_kept"):
        assert row[key] == chain_stats[key]
    assert drafter.last_stats["acceptance_length"] == chain_stats["acceptance_length"]


# --- the ragged cache ------------------------------------------------------------------------------
def test_compaction_keeps_each_rows_entries_in_order():
    from transformers import DynamicCache

    cache = DynamicCache()
    keys = torch.arange(2 * 6, dtype=torch.float).reshape(2, 1, 6, 1)
    cache.update(keys, keys + 100, 0)
    valid = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    ragged = RaggedCache(cache, valid)
    ragged.settle()  # waste = 6 - 5 columns: under the threshold, nothing moves
    assert ragged.compactions == 0 and ragged.length == 6
    ragged.compact()
    assert ragged.valid.tolist() == [[False, False, True, True, True], [True] * 5]
    assert cache.layers[0].keys[0, 0, 2:, 0].tolist() == [1.0, 2.0, 4.0]
    assert cache.layers[0].keys[1, 0, :, 0].tolist() == [6.0, 7.0, 9.0, 10.0, 11.0]
    assert cache.layers[0].values[1, 0, :, 0].tolist() == [106.0, 107.0, 109.0, 110.0, 111.0]
