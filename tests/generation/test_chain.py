"""Chain decoding through transformers' assisted loop, round by round: the drafts and acceptances of
every target pass are exactly the ones an oracle drafter's corruption pattern implies (the
mode-independent guarantees are in test_contract.py)."""

from __future__ import annotations

import torch
from conftest import check_stats, is_corrupted, oracle_drafter

NEW_TOKENS = 48


def expected_rounds(prompt_length, total_length, num_draft_tokens, eos_position=None):
    """Replays the oracle's rounds: (drafted, accepted) per target pass after the prefill.

    `eos_position` is the sequence index of the EOS token, if the output ends with one: the
    drafter stops drafting after proposing it.
    """
    rounds, length = [], prompt_length + 1  # the prefill pass produces one token
    while length < total_length:
        budget = total_length - length - 1 if eos_position is None else None
        num = num_draft_tokens if budget is None else min(num_draft_tokens, budget)
        if eos_position is not None:
            num = min(num, eos_position - length + 1)
        drafted = list(range(length, length + num))
        accepted = 0
        for position in drafted:
            if is_corrupted(position):
                break
            accepted += 1
        # generate() cuts the accepted tokens at EOS / max length; the last kept token counts as the bonus
        accepted = min(accepted, total_length - length - 1)
        rounds.append((len(drafted), accepted))
        length += accepted + 1
    return rounds


def test_oracle_drafter_greedy_equality_and_stats(target, inputs):
    reference = target.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    drafter = oracle_drafter(target, reference)
    output = target.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, assistant_model=drafter)
    assert torch.equal(output, reference)

    prompt_length = inputs["input_ids"].shape[1]
    stats = drafter.last_stats
    check_stats(stats, prompt_length, output)
    rounds = expected_rounds(prompt_length, reference.shape[1], drafter.decoding_options.num_draft_tokens)
    assert stats["drafted_per_pass"] == [drafted for drafted, _ in rounds]
    assert stats["accepted_per_pass"] == [0] + [accepted for _, accepted in rounds]
    # the corruption pattern gives rejected, partially and fully accepted rounds
    kinds = {("none" if a == 0 else "full" if a == d else "partial") for d, a in rounds if d > 0}
    assert kinds == {"none", "partial", "full"}
    assert stats["acceptance_length"] > 2.0


def test_eos_inside_a_draft(target, inputs):
    reference = target.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    new = reference[0, prompt_length:].tolist()
    # An EOS id whose first occurrence is as late as possible, at a position the oracle gets right.
    first = {}
    for index, token in enumerate(new):
        first.setdefault(token, index)
    candidates = [(i, t) for t, i in first.items() if i > 0 and not is_corrupted(prompt_length + i)]
    eos_index, eos = max(candidates)
    plain = target.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos)
    assert plain.shape[1] == prompt_length + eos_index + 1 and plain[0, -1] == eos

    drafter = oracle_drafter(target, plain)
    output = target.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, assistant_model=drafter)
    assert torch.equal(output, plain)
    stats = drafter.last_stats
    check_stats(stats, prompt_length, output)
    rounds = expected_rounds(prompt_length, plain.shape[1], drafter.decoding_options.num_draft_tokens, eos_position=plain.shape[1] - 1)
    assert stats["accepted_per_pass"] == [0] + [accepted for _, accepted in rounds]


def test_adaptive_draft_length(target, inputs):
    reference = target.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    drafter = oracle_drafter(target, reference, draft_schedule="heuristic", num_draft_tokens=2)
    output = target.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, assistant_model=drafter)
    assert torch.equal(output, reference)
    assert len(set(drafter.last_stats["drafted_per_pass"])) > 1
