"""Entropy-adaptive layer selection on hand-built attention maps."""

from __future__ import annotations

import math

import torch
from conftest import cached_target

from hf_dream import get_target_adapter
from hf_dream.configuration_dream import default_entropy_candidate_layers
from hf_dream.features import read_teacher, select_layers_by_entropy
from hf_dream.testing import make_tiny_inputs


def entropy(probs):
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


def test_known_argmin_per_token():
    # three candidate layers, two tokens; token 0 is sharpest in layer 5, token 1 in layer 2
    sharp, flat, medium = torch.tensor([0.97, 0.01, 0.01, 0.01]), torch.full((4,), 0.25), torch.tensor([0.7, 0.1, 0.1, 0.1])
    maps = {2: [flat, sharp], 3: [medium, medium], 5: [sharp, flat]}
    entropies = torch.stack([torch.stack([entropy(p) for p in maps[layer]])[None] for layer in (2, 3, 5)])
    assert select_layers_by_entropy(entropies, [2, 3, 5]).tolist() == [[5, 2]]


def test_ties_go_to_the_shallower_layer():
    entropies = torch.tensor([[[1.0, 0.5]], [[1.0, 0.5]], [[2.0, 0.5]]])
    assert select_layers_by_entropy(entropies, [1, 2, 3]).tolist() == [[1, 1]]


def test_default_candidate_range_follows_the_reference_code():
    assert default_entropy_candidate_layers(30) == list(range(1, 11))  # 1 .. int(0.4 * 30) - 2
    assert default_entropy_candidate_layers(18) == list(range(1, 6))
    assert default_entropy_candidate_layers(2) == [1]  # never empty


def test_read_teacher_selects_the_lowest_entropy_layer_per_token():
    target = cached_target("idefics3")
    adapter = get_target_adapter(target)
    inputs = make_tiny_inputs(target, seed=2)
    candidates = [0, 1]
    signals = read_teacher(adapter, inputs, candidate_layers=candidates, keep_ratio=0.5)
    # recompute the attention maps with eager attention and check the choice token by token
    from hf_dream.testing import build_tiny_target

    eager = build_tiny_target("idefics3", attn_implementation="eager")
    eager.load_state_dict(target.state_dict())
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True, output_hidden_states=True)
    per_layer = torch.stack([entropy(out.attentions[l]).mean(1) for l in candidates])  # (C, b, n)
    expected = torch.tensor(candidates)[per_layer.argmin(0)]
    assert torch.equal(signals.mid_layers, expected)
    chosen = torch.stack([out.hidden_states[l] for l in candidates]).gather(0, per_layer.argmin(0)[None, ..., None].expand(1, -1, -1, out.hidden_states[0].shape[-1]))[0]
    assert torch.allclose(signals.mid_features, chosen, atol=1e-5)
    assert torch.allclose(signals.features, out.hidden_states[-1], atol=1e-5)
    image_mask = adapter.image_token_mask(inputs["input_ids"])
    assert int((signals.keep & image_mask).sum()) == math.ceil(0.5 * int(image_mask.sum()))
    assert signals.keep[~image_mask].all()
