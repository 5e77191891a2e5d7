"""The Qwen-VL target adapters (registration and video tokens: tests/test_targets.py): M-RoPE sizing
from the public configs, and Qwen3-VL's entropy candidates after its deepstack injections."""

from __future__ import annotations

import pytest
from conftest import cached_target

from hf_dream import DreamDraftModel
from hf_dream.hub.sizing import dream_config_from_target_config

# public config.json values (text parts) of Qwen2.5-VL-7B-Instruct and Qwen3-VL-8B-Instruct
QWEN2_5_VL_7B = {
    "model_type": "qwen2_5_vl", "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
    "num_key_value_heads": 4, "num_hidden_layers": 28, "vocab_size": 152064, "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "max_position_embeddings": 128000,
    "image_token_id": 151655, "video_token_id": 151656,
}
QWEN3_VL_8B = {
    "model_type": "qwen3_vl", "image_token_id": 151655, "video_token_id": 151656,
    "text_config": {
        "hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "num_hidden_layers": 36, "vocab_size": 151936, "rope_theta": 5000000, "max_position_embeddings": 262144,
        "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
    },
    "vision_config": {"deepstack_visual_indexes": [8, 16, 24], "out_hidden_size": 4096},
}


@pytest.mark.parametrize(
    "config, section, interleaved, candidates",
    [(QWEN2_5_VL_7B, [16, 24, 24], False, list(range(1, 10))), (QWEN3_VL_8B, [24, 20, 20], True, list(range(4, 13)))],
)
def test_drafters_are_sized_from_the_real_configs(config, section, interleaved, candidates):
    """M-RoPE sections from the text config; Qwen3-VL-8B (36 layers, 3 deepstack injections) drops
    layers 1-3 from the reference range 1 .. int(0.4 * 36) - 2 = 12."""
    dream = dream_config_from_target_config(config)
    assert dream.mrope_section == section and dream.mrope_interleaved is interleaved
    assert dream.head_dim == 128 and dream.entropy_candidate_layers == candidates


def test_a_drafter_for_one_rotary_layout_refuses_a_wrong_section():
    with pytest.raises(ValueError, match="mrope_section"):
        DreamDraftModel.config_for_target(cached_target("qwen2_5_vl"), mrope_section=[2, 2, 2])
