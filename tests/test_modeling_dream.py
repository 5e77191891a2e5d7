"""DreamDraftModel: architecture, save/load round trip, no target weights on disk, strict loading."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import cached_target
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, DynamicCache

from hf_dream import DreamConfig, DreamDraftModel


def random_inputs(drafter, length=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = drafter.config.hidden_size
    embeds = torch.randn(1, length, hidden, generator=generator)
    features = torch.randn(1, length, hidden, generator=generator)
    positions = torch.arange(length)[None]
    return embeds, features, positions


def trained_looking(drafter):
    """Non-zero gates, so that the cross-attention block actually contributes."""
    with torch.no_grad():
        if drafter.cross_block is not None:
            drafter.cross_block.attn_gate.fill_(0.7)
            drafter.cross_block.mlp_gate.fill_(0.5)
    return drafter


@pytest.mark.parametrize("fusion", ["cross_attention", "concat", "cross_attention_concat"])
def test_from_target_sizes_and_record(family, fusion):
    target = cached_target(family)
    drafter = DreamDraftModel.from_target(target, fusion=fusion)
    text = target.config.get_text_config()
    config = drafter.config
    assert (config.hidden_size, config.vocab_size) == (text.hidden_size, text.vocab_size)
    assert config.target_model_type == target.config.model_type
    assert config.target_num_hidden_layers == text.num_hidden_layers
    assert config.entropy_candidate_layers and max(config.entropy_candidate_layers) < text.num_hidden_layers
    assert (drafter.cross_block is not None) == (fusion != "concat") and (drafter.middle_block is None) == (fusion != "concat")
    assert (drafter.fusion_proj is not None) == (fusion != "cross_attention")  # EAGLE's input: [embedding; previous feature]
    # no target parameter is registered inside the drafter
    target_params = {id(p) for p in target.parameters()}
    assert not any(id(p) in target_params for p in drafter.parameters())
    embeds, features, positions = random_inputs(drafter)
    out = drafter(embeds, positions, target_features=features)
    assert out.logits.shape == (1, 9, text.vocab_size)
    assert out.features.shape == out.first_block_hidden.shape == (1, 9, text.hidden_size)


def test_cross_attention_sees_only_earlier_features():
    target = cached_target("llava")
    drafter = trained_looking(DreamDraftModel.from_target(target))
    embeds, features, positions = random_inputs(drafter)
    base = drafter(embeds, positions, target_features=features).logits
    changed = features.clone()
    changed[:, 4] += 5.0  # the feature of position 4 may only influence positions >= 5
    after = drafter(embeds, positions, target_features=changed).logits
    assert torch.allclose(base[:, :5], after[:, :5], atol=1e-6)
    assert not torch.allclose(base[:, 5:], after[:, 5:], atol=1e-4)


@pytest.mark.parametrize("fusion", ["cross_attention", "concat"])
def test_incremental_decoding_matches_full_forward(fusion):
    target = cached_target("idefics3")
    drafter = trained_looking(DreamDraftModel.from_target(target, fusion=fusion))
    embeds, features, positions = random_inputs(drafter, length=10)
    full = drafter(embeds, positions, target_features=features)
    cache, memory = DynamicCache(), drafter.new_memory(features)
    pieces = [drafter(embeds[:, :6], positions[:, :6], memory=memory, cache=cache).logits]
    pieces.append(drafter(embeds[:, 6:8], positions[:, 6:8], memory=memory, cache=cache).logits)
    for index in (8, 9):
        pieces.append(drafter(embeds[:, index : index + 1], positions[:, index : index + 1], memory=memory, cache=cache).logits)
    assert torch.allclose(torch.cat(pieces, dim=1), full.logits, atol=1e-5)


def test_feature_memory_slots_per_row():
    """The one feature memory of every mode: slot p of a row is that row's position p, written per
    row at different starts, appended and cropped (chains), forked per tree node, rows selected."""
    drafter = DreamDraftModel.from_target(cached_target("llava"))
    hidden = drafter.config.hidden_size
    first, more = torch.randn(2, 4, hidden), torch.randn(2, 2, hidden)
    memory = drafter.new_memory(first)
    memory.write(more, torch.tensor([1, 3]))  # rows at different positions
    assert len(memory) == 5 and memory.keys.shape[2] == 5
    assert torch.equal(memory.features[0, 1:3], more[0]) and torch.equal(memory.features[1, 3:5], more[1])
    assert torch.equal(memory.features[0, 0], first[0, 0]) and torch.equal(memory.features[1, :3], first[1, :3])
    keys, _ = drafter.cross_block.cross_attn.project_memory(more)
    torch.testing.assert_close(memory.keys[1, :, 3:5], keys[1])
    fork = memory.fork(torch.tensor([1, 1, 1]), 3)
    assert fork.features.shape == (3, 3, hidden) and torch.equal(fork.features[2], first[1, :3])
    memory.crop(2)
    memory.append(more)
    assert len(memory) == 4 and torch.equal(memory.features[:, 2:4], more)
    memory.select_rows(torch.tensor([1]))
    assert memory.features.shape == (1, 4, hidden) and torch.equal(memory.features[0, 2:4], more[1])


def test_save_load_round_trip_without_target_weights(tmp_path):
    target = cached_target("gemma3")
    drafter = trained_looking(DreamDraftModel.from_target(target, visual_keep_ratio=0.5))
    drafter.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    assert not any("embed" in key or "lm_head" in key for key in keys)
    assert keys == set(drafter.state_dict())
    drafter_bytes = sum(p.numel() * p.element_size() for p in drafter.parameters())
    assert os.path.getsize(tmp_path / "model.safetensors") < drafter_bytes * 1.05
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "dream_drafter" and saved["target_model_type"] == "gemma3"

    for loaded in (DreamDraftModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert isinstance(loaded, DreamDraftModel) and loaded.config.visual_keep_ratio == 0.5
        loaded.attach_target(target)
        embeds, features, positions = random_inputs(drafter)
        expected = drafter(embeds, positions, target_features=features).logits
        assert torch.equal(loaded(embeds, positions, target_features=features).logits, expected)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), DreamConfig)


def test_weights_that_do_not_match_the_config_are_an_error(tmp_path):
    target = cached_target("llava")
    DreamDraftModel.from_target(target).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] *= 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises((ValueError, RuntimeError), match="(?i)mismatch|size"):
        DreamDraftModel.from_pretrained(tmp_path)

    DreamDraftModel.from_target(target, fusion="concat").save_pretrained(tmp_path / "concat")
    config = json.loads((tmp_path / "concat" / "config.json").read_text())
    config["fusion"] = "cross_attention"
    (tmp_path / "concat" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match its config"):
        DreamDraftModel.from_pretrained(tmp_path / "concat")


def test_unattached_drafter_says_what_to_do():
    drafter = DreamDraftModel(DreamDraftModel.config_for_target(cached_target("llava")))
    embeds, features, positions = random_inputs(drafter)
    with pytest.raises(RuntimeError, match="attach_target"):
        drafter(embeds, positions, target_features=features)


@pytest.mark.parametrize("field, value", [("fusion", "mlp"), ("visual_keep_ratio", 0.0), ("draft_vocab_size", 0)])
def test_config_rejects_bad_values(field, value):  # decoding options: tests/generation/test_options.py
    with pytest.raises(ValueError, match=field):
        DreamConfig(hidden_size=64, num_attention_heads=4, **{field: value})


def test_reduced_draft_vocabulary_round_trip(tmp_path):
    target = cached_target("llava")
    drafter = trained_looking(DreamDraftModel.from_target(target, draft_vocab_size=40))
    vocab = torch.arange(100, 140)
    drafter.set_draft_vocab(vocab)
    embeds, features, positions = random_inputs(drafter)
    out = drafter(embeds, positions, target_features=features)
    assert out.logits.shape[-1] == 40
    # the reduced logits are exactly the target lm_head's rows for those ids
    assert torch.allclose(out.logits, target.lm_head(out.features)[..., vocab], atol=1e-6)
    full = drafter.to_target_vocab(out.logits)
    assert full.shape[-1] == target.config.get_text_config().vocab_size
    assert torch.isinf(full[..., :100]).all() and torch.equal(full[..., vocab], out.logits)
    drafter.save_pretrained(tmp_path)
    loaded = DreamDraftModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.draft_vocab, vocab)
    with pytest.raises(ValueError, match="distinct"):
        drafter.set_draft_vocab(torch.zeros(40, dtype=torch.long))
    with pytest.raises(ValueError, match="draft_vocab_size"):
        DreamDraftModel.from_target(target, draft_vocab_size=10**6)


def test_a_folder_without_config_or_a_missing_folder_is_named(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(DreamDraftModel, "__init__", lambda self, *a, **k: built.append(1))
    with pytest.raises(FileNotFoundError, match="No config.json in the drafter folder"):
        DreamDraftModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="Drafter folder not found: /tmp/does_not_exist_hf_dream"):
        DreamDraftModel.from_pretrained("/tmp/does_not_exist_hf_dream")
    assert built == []  # refused before any drafter was built


def decoding_chain(drafter, embeds, positions, features, start, steps):
    """The logits decoding gives at depths 1..steps of a chain drafted from input index `start`, the drafted
    tokens being the given inputs: the prefix up to `start` in one forward with the target's features before it,
    then each step writes the drafter's own feature of the last position in the memory first (`DrafterState.draft_chain`)."""
    cache = DynamicCache()
    memory = drafter.new_memory(features[:, : int(positions[0, start])])
    output = drafter(embeds[:, : start + 1], positions[:, : start + 1], memory=memory, cache=cache)
    logits = [output.logits[:, -1]]
    for depth in range(1, steps):
        memory.write(output.features[:, -1:], int(positions[0, start + depth - 1]))
        index = start + depth
        output = drafter(embeds[:, index : index + 1], positions[:, index : index + 1], memory=memory, cache=cache)
        logits.append(output.logits[:, -1])
    return logits


@pytest.mark.parametrize("fusion", ["cross_attention", "cross_attention_rope", "concat", "cross_attention_concat"])
@pytest.mark.parametrize("pruned", [False, True], ids=["all-tokens", "visual-tokens-pruned"])
def test_unrolled_training_forward_drafts_what_decoding_drafts_at_every_depth(fusion, pruned):
    target = cached_target("idefics3")
    options = {"fusion": "cross_attention", "cross_attention_rope": True} if fusion == "cross_attention_rope" else {"fusion": fusion}
    drafter = trained_looking(DreamDraftModel.from_target(target, **options)).float()
    embeds, features, positions = random_inputs(drafter, length=16, seed=3)
    if pruned:  # positions 3..5 were visual tokens the drafter does not see: the kept tokens keep their positions
        positions = torch.tensor([[0, 1, 2, *range(6, 19)]])
        features = torch.randn(1, 19, drafter.config.hidden_size, generator=torch.Generator().manual_seed(4))
    steps = 4
    unrolled = drafter.forward_unrolled(embeds, positions, features, steps)
    assert torch.allclose(unrolled[0].logits, drafter(embeds, positions, target_features=features).logits, atol=1e-5)
    for start in (4, 7, 11):
        for depth, logits in enumerate(decoding_chain(drafter, embeds, positions, features, start, steps), start=1):
            assert torch.allclose(unrolled[depth - 1].logits[:, start + depth - 1], logits, atol=1e-4), (start, depth)
    # deeper drafts differ from the teacher-forced ones (they read the drafter's own features), and the mask says
    # which indices are real chains: none that starts before the sequence or spans the pruned positions
    assert not torch.allclose(unrolled[2].logits[:, 8:], unrolled[0].logits[:, 8:], atol=1e-3)
    mask = DreamDraftModel.unrolled_chain_mask(positions, 3)
    assert not mask[0, :2].any() and mask[0, 2 + 4 * pruned :].all()
    if pruned:
        assert mask[0, 2] and not mask[0, 3:5].any()  # indices 3, 4 (positions 6, 7) start chains at index 1, 2 across the gap


def test_cross_attention_rope_scores_features_by_their_offset(tmp_path):
    # the same features in other slots: without rope the cross-attention cannot tell (content only), with it it can;
    # a shift of every query and slot by the same amount changes nothing (scores depend on the offset alone)
    target = cached_target("llava")
    outputs = {}
    for rope in (False, True):
        torch.manual_seed(0)
        drafter = trained_looking(DreamDraftModel.from_target(target, cross_attention_rope=rope)).float()
        attention = drafter.cross_block.cross_attn
        generator = torch.Generator().manual_seed(1)
        queries = torch.randn(1, 1, drafter.config.hidden_size, generator=generator)
        keys, values = attention.project_memory(torch.randn(1, 6, drafter.config.hidden_size, generator=generator))
        allowed = torch.ones(1, 1, 1, 6, dtype=torch.bool)
        order = torch.tensor([5, 4, 3, 2, 1, 0])

        def attend(query_at, slots, keys=keys, values=values, attention=attention, queries=queries, allowed=allowed):
            return attention(queries, keys, values, allowed, torch.tensor([[query_at]]), slots[None])

        base = attend(6, torch.arange(6))
        reordered = attend(6, torch.arange(6), keys[:, :, order], values[:, :, order])
        shifted = attend(106, torch.arange(100, 106))
        assert torch.allclose(shifted, base, atol=1e-5)
        outputs[rope] = torch.allclose(reordered, base, atol=1e-5)
    assert outputs == {False: True, True: False}
    drafter.save_pretrained(tmp_path)
    assert DreamDraftModel.from_pretrained(tmp_path).config.cross_attention_rope is True
    with pytest.raises(ValueError, match="cross_attention_rope"):
        DreamDraftModel.from_target(target, fusion="concat", cross_attention_rope=True)


def test_an_eagle3_style_drafter_reads_and_fuses_exactly_its_target_layers():
    target = cached_target("llava")
    drafter = DreamDraftModel.from_target(target, fusion="concat", feature_layers="eagle3")
    layers = target.config.get_text_config().num_hidden_layers
    assert drafter.target_feature_layers == drafter.config.feature_layers and len(drafter.config.feature_layers) >= 2
    assert drafter.feature_fusion.in_features == len(drafter.config.feature_layers) * drafter.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    hidden = tuple(torch.randn(1, 5, drafter.config.hidden_size, generator=generator) for _ in range(layers + 1))
    fused = drafter.fuse_target_features(hidden)
    other = 0 if 0 not in drafter.config.feature_layers else next(i for i in range(layers + 1) if i not in drafter.config.feature_layers)
    changed = tuple(h + 1.0 if i == other else h for i, h in enumerate(hidden))
    assert torch.equal(drafter.fuse_target_features(changed), fused)  # a layer it does not read
    used = drafter.config.feature_layers[0]
    changed = tuple(h + 1.0 if i == used else h for i, h in enumerate(hidden))
    assert not torch.allclose(drafter.fuse_target_features(changed), fused)
    # the training input (the layers concatenated) gives the same features
    concatenated = torch.cat([hidden[i] for i in drafter.config.feature_layers], dim=-1)
    assert torch.equal(drafter.fuse_target_features(concatenated), fused)
    with pytest.raises(ValueError, match="at least two distinct target hidden-state indices"):
        DreamDraftModel.from_target(target, feature_layers=[layers])
    with pytest.raises(ValueError, match="at least two distinct"):
        DreamDraftModel.from_target(target, feature_layers=[1, layers + 1])


@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_decoding_gives_an_eagle3_style_drafter_the_target_layers_it_reads(tree, fusion):
    target = cached_target("llava")
    drafter = DreamDraftModel.from_target(target, fusion=fusion, feature_layers="eagle3")
    seen = []
    fuse = drafter.fuse_target_features

    def recording(hidden_states):
        if not torch.is_tensor(hidden_states):  # the target's hidden_states output (not the drafter's own tensors)
            seen.append(hidden_states)
        return fuse(hidden_states)

    drafter.fuse_target_features = recording
    from hf_dream.testing import make_tiny_inputs

    inputs = make_tiny_inputs(target, seed=1)
    options = {"tree_total_tokens": 6} if tree else {}
    plain = target.generate(**inputs, max_new_tokens=8, do_sample=False)
    output = target.generate(**inputs, max_new_tokens=8, do_sample=False, assistant_model=drafter, **options)
    assert torch.equal(output, plain)
    assert len(seen) >= 2  # the prefill and at least one verification pass
    assert all(hidden[i] is not None for hidden in seen for i in drafter.config.feature_layers)
