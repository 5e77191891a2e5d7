"""The generate() hook: DREAM drafters get DREAM decoding, bad calls fail before any work,
every other assistant behaves exactly as in stock transformers."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_target
from transformers import LlamaConfig, LlamaForCausalLM

from hf_dream import DreamDraftModel
from hf_dream.generation import hook
from hf_dream.testing import make_tiny_inputs


@pytest.fixture
def llava():
    target = cached_target("llava")
    return target, make_tiny_inputs(target, seed=2)


@pytest.fixture
def no_target_forward(monkeypatch):
    """Fails the test if the target's forward (or its vision encoder) runs."""
    calls = []
    target = cached_target("llava")
    for module in (target.model, target.model.vision_tower):
        monkeypatch.setattr(module, "forward", lambda *a, **k: calls.append(1) or pytest.fail("target ran"))
    return calls


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_beams=2), "num_beams=1"),
        (dict(num_beams=2, do_sample=True), "num_beams=1"),
        (dict(prompt_lookup_num_tokens=3), "prompt_lookup"),
        (dict(cache_implementation="static"), "dynamic cache"),
    ],
)
def test_unsupported_modes_fail_before_any_work(llava, no_target_forward, kwargs, message):
    target, inputs = llava
    drafter = DreamDraftModel.from_target(target)
    with pytest.raises(ValueError, match=message):
        target.generate(**inputs, max_new_tokens=5, assistant_model=drafter, **kwargs)


def test_batch_larger_than_one_goes_to_batched_decoding():
    """transformers' assisted loop takes one sequence: a batch with a DREAM drafter is routed to
    `batched_generate` (the same result as plain batched greedy decoding)."""
    target = cached_target("llava")
    inputs = make_tiny_inputs(target, batch_size=2)
    drafter = DreamDraftModel.from_target(target)
    output = target.generate(**inputs, max_new_tokens=5, do_sample=False, assistant_model=drafter)
    assert torch.equal(output, target.generate(**inputs, max_new_tokens=5, do_sample=False))
    assert drafter.last_stats["batch_size"] == 2 and len(drafter.last_stats["rows"]) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_beams=2), "num_beams=1"),
        (dict(prompt_lookup_num_tokens=3), "prompt_lookup"),
        (dict(cache_implementation="static"), "dynamic cache"),
    ],
)
def test_unsupported_modes_with_a_batch_fail_before_any_work(no_target_forward, kwargs, message):
    target = cached_target("llava")
    inputs = make_tiny_inputs(target, batch_size=2)
    drafter = DreamDraftModel.from_target(target)
    with pytest.raises(ValueError, match=message):
        target.generate(**inputs, max_new_tokens=5, assistant_model=drafter, **kwargs)


@pytest.mark.parametrize(
    "other_family, field",
    [("gemma3", "model_type"), ("llava", "hidden_size"), ("llava", "vocab_size")],
)
def test_drafter_for_another_target_fails_before_any_work(llava, no_target_forward, other_family, field):
    target, inputs = llava
    other = cached_target(other_family)
    overrides = {"hidden_size": {"hidden_size": 128, "head_dim": 32}, "vocab_size": {"vocab_size": 512}}
    config = DreamDraftModel.config_for_target(other, **overrides.get(field, {}))
    drafter = DreamDraftModel(config)
    with pytest.raises(ValueError, match=f"{field}: drafter built for"):
        target.generate(**inputs, max_new_tokens=5, assistant_model=drafter)


def test_drafter_on_another_device_fails_before_any_work(llava, no_target_forward):
    target, inputs = llava
    drafter = DreamDraftModel.from_target(target).to("meta")
    with pytest.raises(ValueError, match="drafter is on meta"):
        target.generate(**inputs, max_new_tokens=5, assistant_model=drafter)


def test_unsupported_target_lists_the_families():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(ValueError, match="Supported families: .*gemma3.*idefics3.*llava.*llava_next.*pixtral"):
        DreamDraftModel.from_target(model)


def test_stock_assistant_is_untouched(llava):
    """A plain transformers assistant goes through transformers' own candidate generator."""
    target, inputs = llava
    text = target.config.get_text_config()
    assistant = LlamaForCausalLM(
        LlamaConfig(vocab_size=text.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    ).eval()
    seen = []
    original = hook._ORIGINALS["_get_candidate_generator"]

    def spy(self, *args, **kwargs):
        generator = original(self, *args, **kwargs)
        seen.append(type(generator).__name__)
        return generator

    hook._ORIGINALS["_get_candidate_generator"] = spy
    try:
        reference = target.generate(**inputs, max_new_tokens=10, do_sample=False)
        # stock transformers: a text-only assistant never sees the image
        text_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "pixel_values": inputs["pixel_values"]}
        output = target.generate(**text_inputs, max_new_tokens=10, do_sample=False, assistant_model=assistant)
    finally:
        hook._ORIGINALS["_get_candidate_generator"] = original
    assert seen == ["AssistedCandidateGenerator"]
    assert torch.equal(output, reference)


def test_install_is_idempotent_and_reversible():
    from transformers.generation import GenerationMixin

    wrapped = GenerationMixin._get_candidate_generator
    hook.install()
    assert GenerationMixin._get_candidate_generator is wrapped
    hook.uninstall()
    try:
        assert GenerationMixin._get_candidate_generator is not wrapped
    finally:
        hook.install()
    assert GenerationMixin._get_candidate_generator is hook._get_candidate_generator
