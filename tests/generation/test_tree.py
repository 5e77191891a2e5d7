"""What only tree decoding (`custom_generate=tree_generate`) has: its arguments, a left-padded
prompt of one, the target cache compacted to exactly what a from-scratch run gives, and
`tree_total_tokens="auto"` (the mode-independent guarantees are in test_contract.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_target
from test_contract import mode_oracle
from transformers import DynamicCache

from hf_dream import DreamDraftModel
from hf_dream.generation.tree import DraftTree, compact_cache, tree_generate, verify_tree
from hf_dream.testing import make_tiny_inputs

NEW_TOKENS = 48
TREE = dict(tree_top_k=4, tree_depth=5, tree_total_tokens=16)


def generate_tree(target, inputs, drafter, **kwargs):
    return target.generate(**inputs, custom_generate=tree_generate, drafter=drafter, **{**TREE, **kwargs})


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_left_padded_prompt(family):
    """Padding in the prompt's attention mask stays invisible to the tree, and positions follow
    the ones generate() derived from the mask."""
    target = cached_target(family)
    inputs = dict(make_tiny_inputs(target, seed=1))
    pad = torch.full((1, 3), target.tiny_spec.pad_token_id)
    inputs["input_ids"] = torch.cat([pad, inputs["input_ids"]], dim=1)
    inputs["attention_mask"] = torch.cat([torch.zeros_like(pad), inputs["attention_mask"]], dim=1)
    if "token_type_ids" in inputs:
        inputs["token_type_ids"] = torch.cat([torch.zeros_like(pad), inputs["token_type_ids"]], dim=1)
    reference = target.generate(**inputs, max_new_tokens=20, do_sample=False)
    drafter = mode_oracle(target, {0: reference[0, pad.shape[1] :]})  # the drafter sees unpadded positions
    assert torch.equal(generate_tree(target, inputs, drafter, max_new_tokens=20, do_sample=False), reference)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(num_beams=2), "num_beams=1"), (dict(drafter=None), "DREAM drafter"), (dict(tree_depth=0), "tree_depth")],
)
def test_bad_calls_fail_clearly(kwargs, message):
    target = cached_target("llava")
    inputs = make_tiny_inputs(target, seed=2)
    arguments = dict(TREE, drafter=DreamDraftModel.from_target(target), max_new_tokens=4)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        target.generate(**inputs, custom_generate=tree_generate, **arguments)


def test_node_depths_are_built_once_per_round(monkeypatch):
    """A round lays out its trees' node depths once, for the positions and the mask alike."""
    from hf_dream.generation import engine

    calls = []
    original = engine.tree_depths
    monkeypatch.setattr(engine, "tree_depths", lambda trees: calls.append(len(trees)) or original(trees))
    target = cached_target("llava")
    inputs = make_tiny_inputs(target, seed=3)
    reference = target.generate(**inputs, max_new_tokens=12, do_sample=False)
    drafter = mode_oracle(target, {0: reference[0]})
    assert torch.equal(generate_tree(target, inputs, drafter, max_new_tokens=12, do_sample=False), reference)
    assert calls and len(calls) == drafter.last_stats["target_passes"] - 1  # every pass but the prefill


# --- cache compaction ----------------------------------------------------------------------------
def _prefill(target, inputs):
    cache = DynamicCache(config=target.config)
    with torch.no_grad():
        target(**inputs, cache=cache, use_cache=True)
    cache.activate_past_recording()
    return cache


@pytest.mark.parametrize("family", ["llava", "idefics3", "gemma3"])
def test_compaction_after_a_side_branch_equals_a_fresh_run(family):
    target = cached_target(family)
    inputs = make_tiny_inputs(target, seed=4)
    prompt_length = inputs["input_ids"].shape[1]
    low, high = target.tiny_spec.text_token_range
    tokens = torch.randint(low, high, (7,), generator=torch.Generator().manual_seed(0))
    #        root  a  b  c  d  e  f      b: the root's second child, e: b's second child, f: e's child
    parents = [-1, 0, 0, 1, 2, 2, 5]
    tree = DraftTree.from_parents(tokens, parents, ranks=[0, 0, 1, 0, 0, 1, 0])
    path = [2, 5, 6]  # root -> b -> e -> f: through two non-first children

    cache = _prefill(target, inputs)
    with torch.no_grad():
        verification = verify_tree(target, cache, tree, prompt_length, target.config.get_text_config().num_hidden_layers)
    compact_cache(cache, len(tree), torch.tensor([0] + path))

    fresh_inputs = dict(inputs)
    fresh_inputs["input_ids"] = torch.cat([inputs["input_ids"], tokens[[0] + path][None]], dim=1)
    fresh_inputs["attention_mask"] = torch.ones_like(fresh_inputs["input_ids"])
    if "token_type_ids" in inputs:
        fresh_inputs["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.zeros(1, len(path) + 1, dtype=torch.long)], dim=1)
    fresh = DynamicCache(config=target.config)
    with torch.no_grad():
        reference = target(**fresh_inputs, cache=fresh, use_cache=True)

    assert cache.get_seq_length() == fresh.get_seq_length() == prompt_length + len(path) + 1
    for mine, theirs in zip(cache.layers, fresh.layers):
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.values, theirs.values, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(verification.logits[0, [0] + path], reference.logits[0, prompt_length:].float(), atol=1e-4, rtol=1e-4)


# --- auto tree size --------------------------------------------------------------------------------
def test_choose_tree_size_follows_the_verification_cost_curve():
    from hf_dream.generation.cost_model import choose_tree_size

    flat = {n: 0.010 for n in (1, 2, 4, 8, 16, 32, 64)}  # a GPU: verification is free up to 64 tokens
    steep = {n: 0.010 * n for n in (1, 2, 4, 8, 16, 32, 64)}  # a slow CPU: cost grows with every token
    assert choose_tree_size(flat, draft_level_cost=0.0005).total_tokens == 64
    assert choose_tree_size(steep, draft_level_cost=0.0005).total_tokens == 1
    mid = {1: 0.010, 2: 0.011, 4: 0.012, 8: 0.014, 16: 0.030, 32: 0.060, 64: 0.120}
    size = choose_tree_size(mid, draft_level_cost=0.001)
    assert size.total_tokens == 8 and 1 <= size.top_k <= 4 and size.depth >= 2


def test_auto_tree_size_is_measured_and_lossless(target, inputs):
    reference = target.generate(**inputs, max_new_tokens=20, do_sample=False)
    drafter = mode_oracle(target, {0: reference[0]})
    output = target.generate(**inputs, max_new_tokens=20, do_sample=False, custom_generate=tree_generate, drafter=drafter, tree_total_tokens="auto")
    assert torch.equal(output, reference)
    chosen = drafter.last_stats["tree_size"]
    assert chosen["total_tokens"] in chosen["verification_seconds"]
    assert all(seconds > 0 for seconds in chosen["verification_seconds"].values())


def test_observed_acceptance_slope():
    from hf_dream.generation.cost_model import SLOPE_RANGE, observed_acceptance_slope

    assert observed_acceptance_slope(1.0 + 0.8 * 2.0, total_tokens=3) == pytest.approx(0.8)  # the prior's own curve
    assert observed_acceptance_slope(1.0, total_tokens=16) == SLOPE_RANGE[0]  # nothing accepted: the floor, not 0
    assert observed_acceptance_slope(40.0, total_tokens=1) == SLOPE_RANGE[1]


def test_auto_tree_size_adapts_to_the_observed_acceptance(target, inputs, monkeypatch):
    from hf_dream.generation import cost_model

    monkeypatch.setattr(cost_model, "_SLOPES", cost_model.PairMemory())
    # a GPU: verification free up to 16 tokens, cheap drafting; the largest tree pays unless drafts are nearly
    # always wrong (acceptance slope below ~0.13)
    monkeypatch.setattr(cost_model, "measure_verification_costs", lambda model, length: {n: 0.010 for n in (1, 2, 4, 8, 16)})
    monkeypatch.setattr(cost_model, "measure_draft_step_cost", lambda state: 0.001)
    reference = target.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, custom_generate=tree_generate, tree_total_tokens="auto")
    sizes = lambda drafter: [step["total_tokens"] for step in drafter.last_stats["tree_size"]["history"]]  # noqa: E731

    vocab = target.config.get_text_config().vocab_size
    blind = mode_oracle(target, {0: ((reference + 7) % vocab)[0]})  # confidently wrong everywhere
    assert torch.equal(target.generate(**inputs, drafter=blind, **kwargs), reference)
    assert sizes(blind)[0] == 16 and sizes(blind)[-1] == 1
    target.generate(**inputs, drafter=blind, **kwargs)
    assert sizes(blind)[0] == 1  # the estimate carries over to the next call with the same pair

    oracle = mode_oracle(target, {0: reference[0]})
    assert torch.equal(target.generate(**inputs, drafter=oracle, **kwargs), reference)
    assert min(sizes(oracle)) >= 8  # a drafter that is usually right keeps large trees
