"""Attention read from the target, visual-token importance and draft-side visual compression."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import cached_target

from hf_dream import DreamDraftModel, get_target_adapter
from hf_dream.features import attention_entropy, attention_received, recording_attention_inputs, select_visual_tokens
from hf_dream.testing import build_tiny_target, make_tiny_inputs


def test_recomputed_attention_matches_eager_attention(family):
    """Our float32 recomputation of a layer's attention equals the target's own eager attention."""
    target = build_tiny_target(family, attn_implementation="eager")
    inputs = make_tiny_inputs(target, seed=4)
    layers = get_target_adapter(target).decoder_layers
    last = len(layers) - 1
    with torch.no_grad(), recording_attention_inputs(layers, [0, last]) as recorder:
        out = target(**inputs, output_attentions=True)
    for index in (0, last):
        hidden_states, position_embeddings = recorder.inputs[index]
        probs = out.attentions[index]
        if family in ("gemma3", "gemma4"):
            # Gemma3 lets image tokens attend to each other bidirectionally; compare text queries only.
            text_rows = ~get_target_adapter(target).image_token_mask(inputs["input_ids"])[0]
            received = probs[:, :, text_rows].sum(dim=(1, 2))
            from hf_dream.features import iter_attention_probs

            ours = sum(p[:, :, text_rows].sum(dim=(1, 2)) for p in iter_attention_probs(layers[index].self_attn, hidden_states, position_embeddings))
            assert torch.allclose(ours, received, atol=1e-4)
            continue
        assert torch.allclose(attention_received(layers[index].self_attn, hidden_states, position_embeddings), probs.sum(dim=(1, 2)), atol=1e-4)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean(1)
        assert torch.allclose(attention_entropy(layers[index].self_attn, hidden_states, position_embeddings), entropy, atol=1e-4)


def test_select_visual_tokens_keeps_text_and_most_attended_images():
    image_mask = torch.tensor([[False, True, True, True, True, True, True, True, True, False]])
    importance = torch.tensor([[0.0, 5.0, 1.0, 7.0, 2.0, 9.0, 3.0, 4.0, 0.5, 0.0]])
    keep = select_visual_tokens(importance, image_mask, keep_ratio=0.75)
    assert keep[0, 0] and keep[0, -1]  # text is always kept
    assert int((keep & image_mask).sum()) == math.ceil(0.75 * 8)
    assert not keep[0, 2] and not keep[0, 8]  # the two least attended visual tokens
    assert select_visual_tokens(importance, image_mask, keep_ratio=1.0).all()


@pytest.mark.parametrize("keep_ratio", [0.25, 0.75, 1.0])
def test_drafter_prefill_sees_kept_tokens_at_original_positions(family, keep_ratio):
    target = cached_target(family)
    inputs = make_tiny_inputs(target, seed=5)
    adapter = get_target_adapter(target)
    image_mask = adapter.image_token_mask(inputs["input_ids"])[0]
    num_visual, prompt_length = int(image_mask.sum()), inputs["input_ids"].shape[1]

    drafter = DreamDraftModel.from_target(target, visual_keep_ratio=keep_ratio)
    calls = []
    original = drafter.forward
    drafter.forward = lambda embeds, positions, **kw: calls.append((embeds, positions)) or original(embeds, positions, **kw)
    reference = target.generate(**inputs, max_new_tokens=12, do_sample=False)
    with torch.no_grad(), recording_attention_inputs(adapter.decoder_layers, [len(adapter.decoder_layers) - 1]) as recorder:
        target(**inputs)
    output = target.generate(**inputs, max_new_tokens=12, do_sample=False, assistant_model=drafter)
    assert torch.equal(output, reference)  # compression never changes the target's output

    embeds, positions = calls[0]
    kept_visual = math.ceil(keep_ratio * num_visual)
    assert embeds.shape[1] == prompt_length - num_visual + kept_visual + 1  # + the first generated token
    positions = positions[0].tolist()
    assert positions == sorted(positions) and positions[-1] == prompt_length
    kept = torch.zeros(prompt_length, dtype=torch.bool)
    kept[positions[:-1]] = True
    assert kept[~image_mask].all()
    assert drafter.last_stats["visual_tokens"] == num_visual
    assert drafter.last_stats["visual_tokens_kept"] == kept_visual
    # the dropped visual tokens are the least attended in the target's last layer
    hidden_states, position_embeddings = recorder.inputs[len(adapter.decoder_layers) - 1]
    importance = attention_received(adapter.decoder_layers[-1].self_attn, hidden_states, position_embeddings)[0]
    dropped = image_mask & ~kept
    if dropped.any():
        assert importance[dropped].max() <= importance[image_mask & kept].min() + 1e-6
    # kept image positions carry the target's merged image embeddings (not the placeholder's)
    prompt_embeds = target(**inputs, output_hidden_states=True).hidden_states[0][0]
    assert torch.allclose(embeds[0, :-1], prompt_embeds[kept], atol=1e-6)
