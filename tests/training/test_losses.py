"""DREAM losses: zero when the draft equals the teacher, positive otherwise, masked to responses."""

from __future__ import annotations

import torch

from hf_dream.modeling_dream import DreamDraftOutput
from hf_dream.training.data import response_mask
from hf_dream.training.losses import dream_losses, kl_target_to_draft, top1_agreement


def make(seed=0, b=2, k=6, h=8, v=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, v, generator=g), torch.randn(b, k, h, generator=g), torch.randn(b, k, h, generator=g)


def test_losses_are_zero_when_the_draft_equals_the_teacher():
    logits, features, mid = make()
    draft = DreamDraftOutput(logits=logits.clone(), features=features.clone(), first_block_hidden=mid.clone())
    mask = torch.ones(2, 6, dtype=torch.bool)
    losses = dream_losses(draft, logits, features, mid, mask)
    assert set(losses) == {"kl", "final", "mid"}
    for value in losses.values():
        assert abs(float(value)) < 1e-6


def test_losses_are_positive_otherwise_and_the_mid_term_can_be_off():
    logits, features, mid = make()
    other_logits, other_features, other_mid = make(seed=1)
    draft = DreamDraftOutput(logits=other_logits, features=other_features, first_block_hidden=other_mid)
    mask = torch.ones(2, 6, dtype=torch.bool)
    losses = dream_losses(draft, logits, features, mid, mask)
    assert all(float(value) > 0.01 for value in losses.values())
    assert "mid" not in dream_losses(draft, logits, features, None, mask)


def test_kl_matches_its_definition():
    p_logits, q_logits = torch.randn(1, 1, 5), torch.randn(1, 1, 5)
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    assert torch.allclose(kl_target_to_draft(p_logits, q_logits), (p * (p / q).log()).sum(-1), atol=1e-6)


def test_losses_only_count_masked_positions():
    logits, features, mid = make()
    other_logits, other_features, other_mid = make(seed=1)
    # the draft is wrong only where the mask is False
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 3:] = True
    draft_logits = torch.where(mask[..., None], logits, other_logits)
    draft_features = torch.where(mask[..., None], features, other_features)
    draft_mid = torch.where(mask[..., None], mid, other_mid)
    draft = DreamDraftOutput(logits=draft_logits, features=draft_features, first_block_hidden=draft_mid)
    for value in dream_losses(draft, logits, features, mid, mask).values():
        assert abs(float(value)) < 1e-6
    assert top1_agreement(logits, draft_logits, mask) == (6, 6)


def test_response_mask_marks_positions_that_predict_response_tokens():
    batch = {
        "input_ids": torch.zeros(2, 8, dtype=torch.long),
        "prompt_lengths": torch.tensor([3, 5]),
        "sequence_lengths": torch.tensor([6, 8]),
    }
    mask = response_mask(batch)
    # row 0: tokens 3, 4, 5 are the response; positions 2, 3, 4 predict them
    assert mask[0].tolist() == [False, False, True, True, True, False, False, False]
    assert mask[1].tolist() == [False, False, False, False, True, True, True, False]


def test_most_frequent_tokens_and_coverage():
    from datasets import Dataset

    from hf_dream.training.vocab import most_frequent_tokens, vocabulary_coverage

    dataset = Dataset.from_dict({"input_ids": [[9, 9, 5, 5, 5, 7], [9, 8, 8, 8, 6]], "prompt_length": [2, 1]})
    # response tokens: 5 x3, 7 x1, 8 x3, 6 x1 (prompt tokens 9 are not counted)
    vocab = most_frequent_tokens(dataset, 3, always=[2])
    assert vocab.tolist() == [2, 5, 8]
    assert vocabulary_coverage(dataset, vocab) == 6 / 8
