"""DreamConfig names wrong-typed values and warns about unknown keys (typos would otherwise be ignored)."""

from __future__ import annotations

import json
import warnings

import pytest

from hf_dream import DreamConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_draft_tokens": "5"}, r"`num_draft_tokens` must be int, got '5' \(str\)"),
        ({"visual_keep_ratio": "0.5"}, r"`visual_keep_ratio` must be float"),
        ({"fusion": 1}, r"`fusion` must be str"),
        ({"draft_vocab_size": True}, r"`draft_vocab_size` must be int or None"),
    ],
)
def test_a_wrong_typed_value_names_the_field(kwargs, message):
    with pytest.raises(TypeError, match=message):
        DreamConfig(**kwargs)


def test_unknown_keys_warn_with_the_closest_field(tmp_path):
    with pytest.warns(UserWarning, match=r"unknown key\(s\) 'foo', 'num_draft_token' \(did you mean 'num_draft_tokens'\?\)"):
        DreamConfig(foo=1, num_draft_token=3)
    config = DreamConfig(hidden_size=64, num_attention_heads=4, vocab_size=100, rope_theta=10000)
    config.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a config hf-dream saved loads without a warning
        DreamConfig.from_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "num_draft_token": 3}))
    with pytest.warns(UserWarning, match="did you mean 'num_draft_tokens'"):
        DreamConfig.from_pretrained(tmp_path)
