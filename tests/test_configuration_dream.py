"""DreamConfig describes the drafter model only, names wrong-typed values and warns about unknown keys: decoding options are not fields, and folders saved
when they were (config.json with `num_draft_tokens` / `draft_schedule`) still load, their values
becoming the drafter's default decoding options."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import cached_target
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from hf_dream import DreamConfig, DreamDecodingOptions, DreamDraftModel
from hf_dream.reference import reference_drafter_dir

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(hidden_size=64, num_attention_heads=4)


def test_decoding_options_are_not_config_fields():
    config = DreamConfig(**SMALL)
    saved = config.to_dict()
    for name in DreamDecodingOptions.names():
        assert name not in saved
        assert not hasattr(config, name)
    with pytest.raises(AttributeError, match=r"decoding option.*generate\(\.\.\., assistant_model=drafter, draft_schedule="):
        config.draft_schedule = "auto"  # the old way would silently do nothing now


def old_drafter_folder(tmp_path, **legacy) -> Path:
    """A drafter folder as earlier releases saved it: decoding options inside config.json."""
    drafter = DreamDraftModel.from_target(cached_target("llava"))
    drafter.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **legacy}))
    return tmp_path


def test_old_folder_with_decoding_options_loads_them_as_the_drafter_defaults(tmp_path):
    folder = old_drafter_folder(tmp_path, num_draft_tokens=3, draft_schedule="heuristic")
    logger = logging.get_logger("hf_dream.generation.options")
    with CaptureLogger(logger) as captured:
        drafter = DreamDraftModel.from_pretrained(folder)
    assert drafter.decoding_options == DreamDecodingOptions(num_draft_tokens=3, draft_schedule="heuristic")
    assert "num_draft_tokens=3" in captured.out and "not saved with it again" in captured.out
    # saved again: a clean config, the options are per-call settings now
    drafter.save_pretrained(tmp_path / "again")
    assert "num_draft_tokens" not in json.loads((tmp_path / "again" / "config.json").read_text())
    assert DreamDraftModel.from_pretrained(tmp_path / "again").decoding_options == DreamDecodingOptions()


def test_old_folder_options_are_used_and_a_call_overrides_them(tmp_path):
    target = cached_target("llava")
    from hf_dream.testing import make_tiny_inputs

    inputs = make_tiny_inputs(target, seed=0)
    drafter = DreamDraftModel.from_pretrained(old_drafter_folder(tmp_path, num_draft_tokens=2))
    drafter.attach_target(target)
    greedy = dict(max_new_tokens=16, do_sample=False)
    reference = target.generate(**inputs, **greedy)
    assert torch.equal(target.generate(**inputs, **greedy, assistant_model=drafter), reference)
    assert max(drafter.last_stats["drafted_per_pass"]) <= 2
    target.generate(**inputs, **greedy, assistant_model=drafter, num_draft_tokens=4)
    assert max(drafter.last_stats["drafted_per_pass"]) > 2


def test_old_folder_with_a_bad_or_unknown_option_names_it(tmp_path):
    with pytest.raises(ValueError, match="`num_draft_tokens` must be an int >= 1, got 0"):
        DreamDraftModel.from_pretrained(old_drafter_folder(tmp_path, num_draft_tokens=0))


# gemma3-ref's drafter was saved before the decoding options left config.json; smolvlm-ref's v2 drafter after
@pytest.mark.parametrize("name, saved_the_old_way", [("smolvlm-ref", False), ("gemma3-ref", True)])
def test_committed_reference_drafters_still_load(name, saved_the_old_way):
    folder = reference_drafter_dir(name)
    assert ("num_draft_tokens" in json.loads((Path(folder) / "config.json").read_text())) is saved_the_old_way
    drafter = DreamDraftModel.from_pretrained(folder)
    assert drafter.decoding_options == DreamDecodingOptions()


def test_committed_model_card_configs_still_load():
    paths = sorted((ROOT / "model_cards").glob("*/config.json"))
    assert paths
    for path in paths:
        config = DreamConfig.from_json_file(path)
        assert not hasattr(config, "num_draft_tokens"), path


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hidden_size": "64"}, r"`hidden_size` must be int, got '64' \(str\)"),
        ({"visual_keep_ratio": "0.5"}, r"`visual_keep_ratio` must be float"),
        ({"fusion": 1}, r"`fusion` must be str"),
        ({"draft_vocab_size": True}, r"`draft_vocab_size` must be int or None"),
    ],
)
def test_a_wrong_typed_value_names_the_field(kwargs, message):
    with pytest.raises(TypeError, match=message):
        DreamConfig(**kwargs)


def test_unknown_keys_warn_with_the_closest_field(tmp_path):
    with pytest.warns(UserWarning, match=r"unknown key\(s\) 'foo', 'hiden_size' \(did you mean 'hidden_size'\?\)"):
        DreamConfig(foo=1, hiden_size=3)
    with pytest.warns(UserWarning, match=r"'num_draft_token' \(did you mean 'num_draft_tokens'\?\)"):  # an old folder's option
        DreamConfig(num_draft_token=3)
    config = DreamConfig(hidden_size=64, num_attention_heads=4, vocab_size=100, rope_theta=10000)
    config.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a config hf-dream saved loads without a warning
        DreamConfig.from_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "hiden_size": 3}))
    with pytest.warns(UserWarning, match="did you mean 'hidden_size'"):
        DreamConfig.from_pretrained(tmp_path)
