"""Target adapters: which families are supported, what an unsupported target is told, per-family facts."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_target
from transformers import LlamaConfig, LlamaForCausalLM

from hf_dream import DreamDraftModel, get_target_adapter, supported_families
from hf_dream.hub.sizing import ConfigOnlyTarget
from hf_dream.testing import SUPPORTED_TINY_FAMILIES

LATER_FAMILIES = ("mistral3", "llava_onevision", "internvl", "gemma4", "qwen2_5_vl", "qwen3_vl")


def test_every_tiny_family_is_a_supported_family():
    assert set(SUPPORTED_TINY_FAMILIES) <= set(supported_families())
    assert set(LATER_FAMILIES) <= set(supported_families())


def test_an_unsupported_target_fails_before_any_work_and_lists_every_family(monkeypatch):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("the target ran"))
    with pytest.raises(ValueError, match="no target adapter for model_type='llama'") as error:
        DreamDraftModel.from_target(model)
    for family in supported_families():
        assert family in str(error.value)


def gemma4_config(**text):
    from transformers import Gemma4Config, Gemma4TextConfig

    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return Gemma4Config(text_config=Gemma4TextConfig(**sizes, **text))


def test_gemma4_with_kv_shared_layers_is_refused_naming_why():
    config = gemma4_config(num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "full_attention"], num_kv_shared_layers=1)
    with pytest.raises(ValueError, match=r"Gemma 4 target: num_kv_shared_layers=1: .*DummyLayer"):
        get_target_adapter(ConfigOnlyTarget(config))  # nothing allocated: refused from the config alone


@pytest.mark.parametrize("family", LATER_FAMILIES)
def test_a_drafter_for_a_later_family_copies_its_targets_sizes(family):
    target = cached_target(family)
    adapter = get_target_adapter(target)
    assert adapter.family == family
    config = DreamDraftModel.config_for_target(target)
    assert (config.hidden_size, config.vocab_size, config.target_model_type) == (adapter.hidden_size, adapter.vocab_size, family)
    layer = adapter.decoder_layers[0].self_attn  # Gemma 4: its first (sliding) layer, whose heads the drafter takes
    assert config.head_dim == layer.head_dim and config.num_key_value_heads * layer.num_key_value_groups == config.num_attention_heads
    text = torch.tensor([[5, 6, 7]])
    assert torch.equal(adapter.embed(text), target.get_input_embeddings()(text))


@pytest.mark.parametrize("family", ["llava_onevision", "gemma4", "qwen2_5_vl", "qwen3_vl"])
def test_video_placeholders_count_as_visual_tokens(family):
    adapter = get_target_adapter(cached_target(family))
    spec = cached_target(family).tiny_spec
    ids = torch.tensor([[spec.bos_token_id, spec.image_token_id, spec.video_token_id, 5]])
    assert adapter.image_token_mask(ids).tolist() == [[False, True, True, False]]
