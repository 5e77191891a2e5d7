"""DREAM decoding options (`hf_dream.generation.options`): per-call generate() keywords over the
drafter's defaults over the library defaults, in every mode; mistyped names and bad values are errors
naming them, raised before any model work."""

from __future__ import annotations

import pytest
import torch
from conftest import oracle_drafter

from hf_dream import DreamDecodingOptions
from hf_dream.configuration_dream import DECODING_OPTION_NAMES
from hf_dream.generation.tree import tree_generate
from hf_dream.testing import make_tiny_inputs, stack_tiny_inputs

NEW_TOKENS = 24
GREEDY = dict(max_new_tokens=NEW_TOKENS, do_sample=False)


@pytest.fixture(scope="module")
def setup():
    from conftest import cached_target

    target = cached_target("llava")
    inputs = make_tiny_inputs(target, seed=0)
    reference = target.generate(**inputs, **GREEDY)
    return target, inputs, reference


def test_defaults_are_the_documented_ones():
    assert DreamDecodingOptions().to_dict() == dict(
        num_draft_tokens=5, draft_schedule="constant", tree_top_k=4, tree_depth=5, tree_total_tokens=16, drafter_image="real"
    )
    # the config knows the names without importing the generation package (exported remote code)
    assert DECODING_OPTION_NAMES == DreamDecodingOptions.names()


@pytest.mark.parametrize(
    "field, value",
    [("num_draft_tokens", 0), ("num_draft_tokens", "5"), ("num_draft_tokens", True), ("draft_schedule", "fast"),
     ("tree_top_k", 0), ("tree_top_k", "4"), ("tree_depth", 2.0), ("tree_depth", "5"), ("tree_total_tokens", "big"),
     ("tree_total_tokens", "16"), ("drafter_image", "shuffled")],  # string-typed numbers (issue 15) are named, not compared later
)
def test_bad_values_name_the_option(field, value):
    with pytest.raises(ValueError, match=f"`{field}` must be"):
        DreamDecodingOptions(**{field: value})


def test_updated_overrides_and_refuses_unknown_names():
    options = DreamDecodingOptions().updated(num_draft_tokens=3, tree_total_tokens="auto", tree_depth=None)
    assert (options.num_draft_tokens, options.tree_total_tokens, options.tree_depth) == (3, "auto", 5)
    with pytest.raises(ValueError, match=r"`num_draft_token` \(did you mean `num_draft_tokens`\?\)"):
        options.updated(num_draft_token=2)


def test_per_call_options_override_the_drafter_defaults_for_that_call_only(setup):
    target, inputs, reference = setup
    drafter = oracle_drafter(target, reference)
    assert drafter.decoding_options == DreamDecodingOptions()
    out = target.generate(**inputs, **GREEDY, assistant_model=drafter, num_draft_tokens=2)
    assert torch.equal(out, reference)
    assert max(drafter.last_stats["drafted_per_pass"]) == 2
    target.generate(**inputs, **GREEDY, assistant_model=drafter)
    assert max(drafter.last_stats["drafted_per_pass"]) == 5  # the call's option did not stick

    drafter.decoding_options = drafter.decoding_options.updated(num_draft_tokens=3)
    target.generate(**inputs, **GREEDY, assistant_model=drafter)
    assert max(drafter.last_stats["drafted_per_pass"]) == 3
    out = target.generate(**inputs, **GREEDY, assistant_model=drafter, decoding_options=DreamDecodingOptions(num_draft_tokens=1))
    assert torch.equal(out, reference) and max(drafter.last_stats["drafted_per_pass"]) == 1
    # a keyword beats the options object of the same call
    target.generate(**inputs, **GREEDY, assistant_model=drafter, decoding_options=DreamDecodingOptions(num_draft_tokens=1), num_draft_tokens=4)
    assert max(drafter.last_stats["drafted_per_pass"]) == 4


def test_per_call_schedule(setup):
    target, inputs, reference = setup
    drafter = oracle_drafter(target, reference)
    out = target.generate(**inputs, **GREEDY, assistant_model=drafter, draft_schedule="heuristic", num_draft_tokens=2)
    assert torch.equal(out, reference)
    drafted = drafter.last_stats["drafted_per_pass"]
    assert drafted[0] == 2 and max(drafted) > 2  # grown after full acceptances: the heuristic schedule ran


def test_per_call_options_reach_batches_and_trees(setup):
    target, inputs, reference = setup
    rows = [make_tiny_inputs(target, seed=seed) for seed in (0, 1)]
    batch = stack_tiny_inputs(target, rows)
    drafter = oracle_drafter(target, reference)
    target.generate(**batch, **GREEDY, assistant_model=drafter, num_draft_tokens=2)
    assert max(max(row["drafted_per_pass"]) for row in drafter.last_stats["rows"]) == 2

    out = target.generate(**inputs, **GREEDY, custom_generate=tree_generate, drafter=drafter, tree_total_tokens=3, tree_depth=2)
    assert torch.equal(out, reference)
    assert max(drafter.last_stats["drafted_per_pass"]) <= 3
    drafter.decoding_options = DreamDecodingOptions(tree_total_tokens=2)
    target.generate(**inputs, **GREEDY, custom_generate=tree_generate, drafter=drafter)
    assert max(drafter.last_stats["drafted_per_pass"]) <= 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_draft_token=2), r"`num_draft_token` \(did you mean `num_draft_tokens`\?\)"),
        (dict(draft_schedul="auto"), r"`draft_schedul` \(did you mean `draft_schedule`\?\)"),
        (dict(tree_dept=2, custom_generate=tree_generate), r"`tree_dept` \(did you mean `tree_depth`\?\)"),
        (dict(num_draft_tokens=0), r"`num_draft_tokens` must be an int >= 1, got 0"),
        (dict(decoding_options={"num_draft_tokens": 2}), "must be a DreamDecodingOptions"),
    ],
)
def test_mistyped_options_are_refused_before_any_work(setup, monkeypatch, kwargs, message):
    target, inputs, reference = setup
    drafter = oracle_drafter(target, reference)
    if "custom_generate" in kwargs:
        kwargs = dict(kwargs, drafter=drafter)
    else:
        kwargs = dict(kwargs, assistant_model=drafter)

    def no_forward(*args, **kw):
        raise AssertionError("the target ran before the options were checked")

    monkeypatch.setattr(target, "forward", no_forward)
    with pytest.raises((ValueError, TypeError), match=message):
        target.generate(**inputs, **GREEDY, **kwargs)
