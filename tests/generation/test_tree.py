"""Dynamic-tree DREAM decoding (`custom_generate=tree_generate`): greedy output identical to plain
generate for every family, side branches accepted, EOS / max_new_tokens inside a tree, the target
cache compacted to exactly what a from-scratch run gives, and lossless sampling."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import cached_target, check_stats, oracle_drafter
from transformers import DynamicCache

from hf_dream import DreamDraftModel
from hf_dream.generation import engine
from hf_dream.generation.tree import DraftTree, compact_cache, tree_generate, verify_tree
from hf_dream.testing import build_tiny_target, make_tiny_inputs

NEW_TOKENS = 48
TREE = dict(tree_top_k=4, tree_depth=5, tree_total_tokens=16)


def position_kind(position: int) -> str:
    """Deterministic pseudo-random role of a sequence position for the tree oracle: the target's
    token is the drafter's first choice ("top"), its second choice behind a wrong token ("side"),
    or nowhere in its top-k ("miss")."""
    draw = random.Random(position * 7919 + 17).random()
    return "miss" if draw < 0.2 else "side" if draw < 0.5 else "top"


class TreeOracleDraftModel(DreamDraftModel):
    """A drafter that knows the target's greedy continuation, for every batch row.

    It runs the real DREAM network (caches, feature memory, compression are exercised) and then
    overrides the logits by position: the right token first, second behind a wrong one, or far
    below the top-k. A chain drafter (top-1 only) stops at "side" positions; a tree goes through
    them on a non-first child.
    """

    oracle: torch.Tensor | None = None

    def forward(self, inputs_embeds, position_ids, *args, **kwargs):
        output = super().forward(inputs_embeds, position_ids, *args, **kwargs)
        logits = torch.full_like(output.logits, -10.0)
        vocab = logits.shape[-1]
        for row, positions in enumerate(position_ids.tolist()):
            for index, position in enumerate(positions):
                following = position + 1
                right = int(self.oracle[following]) % vocab if following < len(self.oracle) else 0
                wrong = (right + 1) % vocab
                kind = position_kind(following)
                logits[row, index, right if kind == "top" else wrong] = 10.0
                if kind == "side":
                    logits[row, index, right] = 8.0
                elif kind == "miss":
                    logits[row, index, right] = -30.0
        output.logits = logits
        return output


def tree_oracle(target, sequence: torch.Tensor, **overrides) -> TreeOracleDraftModel:
    return oracle_drafter(target, sequence, cls=TreeOracleDraftModel, **overrides)


def generate_tree(target, inputs, drafter, **kwargs):
    return target.generate(**inputs, custom_generate=tree_generate, drafter=drafter, **{**TREE, **kwargs})


# --- greedy ------------------------------------------------------------------------------------
def test_tree_greedy_equality_through_side_branches(target, inputs):
    reference = target.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    drafter = tree_oracle(target, reference)
    output = generate_tree(target, inputs, drafter, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(output, reference)
    prompt_length = inputs["input_ids"].shape[1]
    tree_stats = dict(drafter.last_stats)
    check_stats(tree_stats, prompt_length, output)
    assert max(tree_stats["drafted_per_pass"]) <= TREE["tree_total_tokens"]
    # accepted paths went through non-first children, and some rounds stopped inside the tree
    assert tree_stats["side_branch_tokens"] > 0
    assert any(0 < accepted < TREE["tree_depth"] for accepted in tree_stats["accepted_per_pass"])

    # the same drafter as a chain (its top-1 only) stops at every side position
    chain = target.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, assistant_model=drafter)
    assert torch.equal(chain, reference)
    assert tree_stats["acceptance_length"] > drafter.last_stats["acceptance_length"]


@pytest.mark.parametrize("fusion", ["cross_attention", "concat"])
def test_untrained_drafter_tree_equality(target, inputs, fusion):
    """A real (random) drafter: its own features fill the tree's memory; output still exact."""
    reference = target.generate(**inputs, max_new_tokens=24, do_sample=False)
    torch.manual_seed(0)
    drafter = DreamDraftModel.from_target(target, fusion=fusion)
    output = generate_tree(target, inputs, drafter, max_new_tokens=24, do_sample=False)
    assert torch.equal(output, reference)
    check_stats(drafter.last_stats, inputs["input_ids"].shape[1], output)


def test_eos_inside_a_tree(target, inputs):
    reference = target.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    new = reference[0, prompt_length:].tolist()
    first = {}
    for index, token in enumerate(new):
        first.setdefault(token, index)
    # an EOS id whose first occurrence is as late as possible, at a position the tree can accept
    candidates = [(i, t) for t, i in first.items() if i > 0 and position_kind(prompt_length + i) != "miss"]
    eos_index, eos = max(candidates)
    plain = target.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos)
    assert plain.shape[1] == prompt_length + eos_index + 1 and plain[0, -1] == eos

    drafter = tree_oracle(target, reference)
    output = generate_tree(target, inputs, drafter, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos)
    assert torch.equal(output, plain)
    check_stats(drafter.last_stats, prompt_length, output)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7, 13])
def test_max_new_tokens_inside_a_tree(max_new_tokens):
    target = cached_target("llava")
    inputs = make_tiny_inputs(target, seed=3)
    reference = target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    long_reference = target.generate(**inputs, max_new_tokens=max_new_tokens + 10, do_sample=False)
    drafter = tree_oracle(target, long_reference)
    output = generate_tree(target, inputs, drafter, max_new_tokens=max_new_tokens, do_sample=False)
    assert torch.equal(output, reference)
    check_stats(drafter.last_stats, inputs["input_ids"].shape[1], output)


def test_gemma3_sliding_window_smaller_than_the_sequence():
    """Sliding layers that overflow their window during generation: the tree mask follows the
    window and compaction trims the layer back to it."""
    target = copy.deepcopy(cached_target("gemma3"))
    target.config.text_config.sliding_window = 8
    for layer in target.model.language_model.layers:
        if layer.self_attn.is_sliding:
            layer.self_attn.sliding_window = 8
    inputs = make_tiny_inputs(target, seed=1)
    reference = target.generate(**inputs, max_new_tokens=30, do_sample=False)
    drafter = tree_oracle(target, reference)
    output = generate_tree(target, inputs, drafter, max_new_tokens=30, do_sample=False)
    assert torch.equal(output, reference)
    assert drafter.last_stats["acceptance_length"] > 1.5


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_eager_attention_takes_the_additive_tree_mask(family):
    target = build_tiny_target(family, attn_implementation="eager")
    inputs = make_tiny_inputs(target, seed=1)
    reference = target.generate(**inputs, max_new_tokens=20, do_sample=False)
    drafter = tree_oracle(target, reference)
    assert torch.equal(generate_tree(target, inputs, drafter, max_new_tokens=20, do_sample=False), reference)
    assert drafter.last_stats["side_branch_tokens"] > 0


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
    drafter = tree_oracle(target, reference)
    assert torch.equal(generate_tree(target, inputs, drafter, max_new_tokens=20, do_sample=False), reference)


def test_generate_outputs_scores_and_streamer():
    target = cached_target("llava")
    inputs = make_tiny_inputs(target, seed=2)
    plain = target.generate(**inputs, max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_scores=True)
    drafter = tree_oracle(target, plain.sequences)

    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1))

        def end(self):
            self.ended = True

    streamer = Recorder()
    output = generate_tree(
        target, inputs, drafter, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
        output_scores=True, streamer=streamer,
    )
    assert torch.equal(output.sequences, plain.sequences)
    assert len(output.scores) == len(plain.scores) == 12
    for mine, theirs in zip(output.scores, plain.scores):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
    assert streamer.ended and torch.equal(torch.cat(streamer.chunks), plain.sequences[0])


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


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_trees_in_a_batch_equal_plain_batched_greedy(family):
    """A batch drafts one tree per row and verifies them in one pass: every row exact."""
    target = cached_target(family)
    inputs = make_tiny_inputs(target, batch_size=2)
    reference = target.generate(**inputs, max_new_tokens=16, do_sample=False)
    torch.manual_seed(0)
    drafter = DreamDraftModel.from_target(target)
    assert torch.equal(generate_tree(target, inputs, drafter, max_new_tokens=16, do_sample=False), reference)
    assert drafter.last_stats["batch_size"] == 2 and "side_branch_tokens" in drafter.last_stats["rows"][0]


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


# --- sampling ------------------------------------------------------------------------------------
SAMPLES = 600
SAMPLING_TREE = dict(tree_top_k=3, tree_depth=3, tree_total_tokens=8)


@pytest.fixture(scope="module")
def sampling_setup():
    from test_sampling import GENERATE_KWARGS, VOCAB, exact_token_marginals

    target = build_tiny_target("llava", seed=11, vocab_size=VOCAB)
    with torch.no_grad():  # peaked, image-dependent distributions make the test sharp
        target.lm_head.weight.mul_(40.0)
    inputs = make_tiny_inputs(target, seed=6)
    # 4 new tokens: the first tree (after the prefill token) is 2 deep, so new tokens 2 and 3
    # come from sibling tries at depth 1 and 2, residual draws and bonus tokens
    kwargs = dict(GENERATE_KWARGS, suppress_tokens=sorted(target.tiny_spec.special_token_ids), max_new_tokens=4)
    greedy = target.generate(**inputs, max_new_tokens=8, do_sample=False)
    drafter = tree_oracle(target, greedy)  # proposes the mode first or second: high acceptance
    p2, p3 = exact_token_marginals(target, inputs, kwargs)
    return target, inputs, kwargs, drafter, p2, p3


def sample_tree_tokens(target, inputs, kwargs, drafter, samples):
    prompt_length = inputs["input_ids"].shape[1]
    tokens, accepted, side = [], 0, 0
    for seed in range(samples):
        torch.manual_seed(seed)
        output = generate_tree(target, inputs, drafter, **kwargs, **SAMPLING_TREE)
        tokens.append(output[0, prompt_length:])
        accepted += drafter.last_stats["accepted_tokens"]
        side += drafter.last_stats["side_branch_tokens"]
    return torch.stack(tokens), accepted, side


def test_tree_sampling_distribution_matches_plain_sampling(sampling_setup):
    from test_sampling import goodness_of_fit

    target, inputs, kwargs, drafter, p2, p3 = sampling_setup
    assert (p2.max() < 0.9) and (p3.max() < 0.9)  # the drafter's proposals really get rejected
    tokens, accepted, side = sample_tree_tokens(target, inputs, kwargs, drafter, SAMPLES)
    assert accepted > SAMPLES and side > SAMPLES // 4  # deep and side-branch acceptances happened
    assert goodness_of_fit(tokens[:, 1], p2) > 1e-3
    assert goodness_of_fit(tokens[:, 2], p3) > 1e-3


def test_forgetting_the_residual_fails_the_same_test(sampling_setup, monkeypatch):
    """A wrong implementation: rejected siblings are not removed from the target distribution
    before the next sibling and the final draw, which favours drafted tokens."""
    from test_sampling import goodness_of_fit

    target, inputs, kwargs, drafter, p2, p3 = sampling_setup
    monkeypatch.setattr(engine, "residual_distribution", lambda p, q: p)
    tokens, _, _ = sample_tree_tokens(target, inputs, kwargs, drafter, SAMPLES)
    assert min(goodness_of_fit(tokens[:, 1], p2), goodness_of_fit(tokens[:, 2], p3)) < 1e-3


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
    drafter = tree_oracle(target, reference)
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
    blind = tree_oracle(target, (reference + 7) % vocab)  # confidently wrong everywhere
    assert torch.equal(target.generate(**inputs, drafter=blind, **kwargs), reference)
    assert sizes(blind)[0] == 16 and sizes(blind)[-1] == 1
    target.generate(**inputs, drafter=blind, **kwargs)
    assert sizes(blind)[0] == 1  # the estimate carries over to the next call with the same pair

    oracle = tree_oracle(target, reference)
    assert torch.equal(target.generate(**inputs, drafter=oracle, **kwargs), reference)
    assert min(sizes(oracle)) >= 8  # a drafter that is usually right keeps large trees
