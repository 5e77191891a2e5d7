"""`draft_schedule="auto"`: chain length from measured costs and the observed acceptance rate."""

from __future__ import annotations

import pytest
import torch
from conftest import check_stats, oracle_drafter

from hf_dream.generation import cost_model
from hf_dream.generation.cost_model import PairMemory, best_draft_length, expected_tokens, interpolate_costs

NEW_TOKENS = 48
FLAT = {n: 0.010 for n in range(1, 10)}  # a GPU: a pass over 9 tokens costs what a pass over one does
STEEP = {n: 0.010 * n for n in range(1, 10)}  # a CPU where every verified token costs a full step


def test_expected_tokens():
    assert expected_tokens(0.0, 5) == 1.0  # only the bonus token
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 1) == pytest.approx(1.5)
    assert expected_tokens(0.8, 4) == pytest.approx(1 + 0.8 + 0.64 + 0.512 + 0.4096)


def test_best_draft_length_follows_costs_and_acceptance():
    assert best_draft_length(0.9, FLAT, draft_step_cost=0.0005) >= 6  # free verification, good drafter: long chains
    assert best_draft_length(0.05, FLAT, draft_step_cost=0.0005) == 1  # a drafter that never hits drafts the least
    assert best_draft_length(0.75, STEEP, draft_step_cost=0.0005) == 1  # every verified token costs a step
    noisy = {**STEEP, 4: 0.001}  # a 4-token pass read faster than a 1-token one is timing noise, not a bargain
    assert best_draft_length(0.5, noisy, draft_step_cost=0.0005) == 1


def test_interpolate_costs():
    costs = interpolate_costs({1: 1.0, 3: 3.0, 9: 6.0}, range(1, 11))
    assert costs[1] == 1.0 and costs[2] == 2.0 and costs[3] == 3.0 and costs[5] == pytest.approx(4.0) and costs[9] == 6.0
    assert costs[10] == 6.0  # beyond the last measurement: the last one


@pytest.fixture
def flat_costs(monkeypatch):
    monkeypatch.setattr(cost_model, "_ESTIMATES", PairMemory())
    monkeypatch.setattr(cost_model, "measure_verification_costs", lambda model, length, sizes: {n: FLAT[n] for n in sizes})
    monkeypatch.setattr(cost_model, "measure_draft_step_cost", lambda state: 0.001)


def test_auto_schedule_is_lossless_and_follows_the_drafter(target, inputs, flat_costs):
    reference = target.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]

    good = oracle_drafter(target, reference, draft_schedule="auto")  # right on ~75% of positions
    output = target.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, assistant_model=good)
    assert torch.equal(output, reference)
    check_stats(good.last_stats, prompt_length, output)
    assert max(good.last_stats["drafted_per_pass"]) >= 3

    vocab = target.config.get_text_config().vocab_size
    blind = oracle_drafter(target, (reference + 7) % vocab, draft_schedule="auto")  # wrong everywhere
    output = target.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, assistant_model=blind)
    assert torch.equal(output, reference)
    drafted = blind.last_stats["drafted_per_pass"]
    assert drafted[0] > 1 and drafted[-6:-1] == [1] * 5  # starts from the prior, ends drafting single tokens (the last round has no budget)
    target.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, assistant_model=blind)
    assert blind.last_stats["drafted_per_pass"][0] == 1  # the estimate carries over to the next call


def test_auto_schedule_sampling_runs(target, inputs, flat_costs):
    reference = target.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    drafter = oracle_drafter(target, reference, draft_schedule="auto")
    torch.manual_seed(0)
    output = target.generate(**inputs, max_new_tokens=16, do_sample=True, assistant_model=drafter)
    assert output.shape[1] <= inputs["input_ids"].shape[1] + 16
    check_stats(drafter.last_stats, inputs["input_ids"].shape[1], output)


def test_remembered_estimates_die_with_their_models():
    """Caches are keyed by weak references, never by id(): a new model at a recycled address
    starts from the prior, and nothing keeps a dead model's entry."""
    import gc

    from torch import nn

    memory = PairMemory()
    target, drafter = nn.Linear(1, 1), nn.Linear(1, 1)
    memory.set(target, drafter, 0.5)
    memory.set(target, None, {1: 0.1}, key="costs")
    assert memory.get(target, drafter) == 0.5 and memory.get(target, None, "costs") == {1: 0.1}
    assert memory.get(target, nn.Linear(1, 1), default="prior") == "prior"
    del drafter
    gc.collect()
    assert len(memory._by_target[target]["drafters"]) == 0
    del target
    gc.collect()
    assert len(memory._by_target) == 0
