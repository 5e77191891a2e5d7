"""Sampling with a DREAM drafter is lossless: the distribution of sampled continuations equals
plain sampling from the target (chi-square goodness of fit against the exact distribution,
computed by enumeration on a tiny vocabulary). A deliberately biased acceptance rule fails the
same test, which shows that the test has the power to catch a wrong implementation."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from hf_dream import DreamDraftModel
from hf_dream.generation.candidate_generator import DreamCandidateGenerator
from hf_dream.testing import build_tiny_target, make_tiny_inputs

VOCAB = 32
SAMPLES = 800
DRAFTER_SEED = 0
NEW_TOKENS = 3
GENERATE_KWARGS = dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.95, max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def setup():
    target = build_tiny_target("llava", seed=11, vocab_size=VOCAB)
    with torch.no_grad():  # peaked, image-dependent distributions make the test sharp
        target.lm_head.weight.mul_(40.0)
    inputs = make_tiny_inputs(target, seed=6)
    suppress = sorted(target.tiny_spec.special_token_ids)
    kwargs = dict(GENERATE_KWARGS, suppress_tokens=suppress)
    torch.manual_seed(DRAFTER_SEED)
    drafter = DreamDraftModel.from_target(target, num_draft_tokens=2, visual_keep_ratio=0.75)
    with torch.no_grad():
        drafter.cross_block.attn_gate.fill_(1.0)
    return target, inputs, kwargs, drafter


def exact_token_marginals(target, inputs, kwargs):
    """Exact marginal distributions of new tokens 2 and 3 under the target's processed sampling
    distribution, by enumerating every (t1, t2) prefix in one batched forward each."""
    from transformers import GenerationConfig

    config = GenerationConfig(**{k: v for k, v in kwargs.items() if k != "max_new_tokens"})
    processors = target._get_logits_processor(config, input_ids_seq_length=inputs["input_ids"].shape[1])

    def next_probs(prefixes):
        batch = prefixes.shape[0]
        repeated = {
            "input_ids": prefixes,
            "attention_mask": torch.ones_like(prefixes),
            "pixel_values": inputs["pixel_values"].repeat(batch, 1, 1, 1),
        }
        with torch.no_grad():
            logits = target(**repeated).logits[:, -1].float()
        return processors(prefixes, logits).softmax(-1)

    prompt = inputs["input_ids"]
    p1 = next_probs(prompt)[0]
    alive1 = (p1 > 0).nonzero().squeeze(-1)  # suppressed ids (the image token...) never occur
    p2_given_1 = torch.zeros(VOCAB, VOCAB)  # (t1, t2)
    p2_given_1[alive1] = next_probs(torch.cat([prompt.repeat(len(alive1), 1), alive1[:, None]], dim=1))
    joint12 = p1[:, None] * p2_given_1
    pairs = torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))
    alive = joint12.flatten() > 0
    prefixes2 = torch.cat([prompt.repeat(int(alive.sum()), 1), pairs[alive]], dim=1)
    p3_given_12 = torch.zeros(VOCAB * VOCAB, VOCAB)
    p3_given_12[alive] = next_probs(prefixes2)
    p3 = (joint12.flatten()[:, None] * p3_given_12).sum(0)
    return joint12.sum(0), p3


def sample_new_tokens(target, inputs, kwargs, drafter, samples):
    prompt_length = inputs["input_ids"].shape[1]
    tokens = []
    for seed in range(samples):
        torch.manual_seed(seed)
        output = target.generate(**inputs, **kwargs, assistant_model=drafter)
        tokens.append(output[0, prompt_length:])
    return torch.stack(tokens)


def goodness_of_fit(observed_tokens, expected_probs):
    counts = torch.bincount(observed_tokens, minlength=VOCAB).double()
    expected = expected_probs.double() * counts.sum()
    big = expected >= 5  # pool rare cells so the chi-square approximation holds
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    if expected[-1] < 5:  # nothing left to pool
        observed, expected = observed[:-1], expected[:-1]
    expected = expected * observed.sum() / expected.sum()
    pvalue = chisquare(observed.numpy(), expected.numpy()).pvalue
    print(f"chi-square p={pvalue:.3g} over {len(observed)} cells")
    return pvalue


class AlwaysAcceptGenerator(DreamCandidateGenerator):
    """A wrong implementation: reports a near-zero draft probability for every drafted token,
    so that transformers' acceptance test keeps every draft (output = the drafter's distribution)."""

    def _draft(self, input_ids, output):
        candidates, logits = super()._draft(input_ids, output)
        if logits is None:
            return candidates, None
        drafted = candidates[:, input_ids.shape[1] :]
        return candidates, torch.zeros_like(logits).scatter(-1, drafted[..., None], -40.0)


@pytest.mark.parametrize("draft_vocab_size", [None, 12])
def test_sampling_distribution_matches_plain_sampling(setup, draft_vocab_size):
    target, inputs, kwargs, drafter = setup
    if draft_vocab_size:  # tokens outside the draft vocabulary have q = 0: still lossless
        torch.manual_seed(DRAFTER_SEED)
        drafter = DreamDraftModel.from_target(target, num_draft_tokens=2, draft_vocab_size=draft_vocab_size)
        with torch.no_grad():
            drafter.cross_block.attn_gate.fill_(1.0)
        drafter.set_draft_vocab(torch.arange(8, 8 + draft_vocab_size))
    p2, p3 = exact_token_marginals(target, inputs, kwargs)
    # the drafter really disagrees with the target (otherwise the test would prove nothing)
    assert (p2.max() < 0.9) and (p3.max() < 0.9)
    tokens = sample_new_tokens(target, inputs, kwargs, drafter, SAMPLES)
    stats_accepted = drafter.last_stats  # last call only: a sanity check that drafting happened
    assert stats_accepted["drafted_tokens"] > 0
    assert goodness_of_fit(tokens[:, 1], p2) > 1e-3
    assert goodness_of_fit(tokens[:, 2], p3) > 1e-3


def test_biased_acceptance_fails_the_same_test(setup, monkeypatch):
    target, inputs, kwargs, drafter = setup
    p2, p3 = exact_token_marginals(target, inputs, kwargs)
    from hf_dream.generation import hook

    monkeypatch.setattr(hook, "DreamCandidateGenerator", AlwaysAcceptGenerator)
    tokens = sample_new_tokens(target, inputs, kwargs, drafter, SAMPLES)
    assert min(goodness_of_fit(tokens[:, 1], p2), goodness_of_fit(tokens[:, 2], p3)) < 1e-3
