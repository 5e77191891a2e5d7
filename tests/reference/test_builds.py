"""Versioned reference builds: the build id lands in the model's config, a drafter records it, another build warns."""

from __future__ import annotations

import time
import warnings

import pytest
import test_smolvlm_reference as smolvlm_tests

import hf_dream
from hf_dream.reference import common, smolvlm


@pytest.fixture
def tiny_build(tmp_path):
    tokenizer = smolvlm_tests.tiny_tokenizer()
    processor = smolvlm.build_processor(tokenizer)
    model = smolvlm.assemble(smolvlm_tests.tiny_text_lm(len(tokenizer) - len(smolvlm.ADDED_TOKENS)), tokenizer)
    weights = smolvlm.save_trained_weights(model, tmp_path / "w.safetensors")
    record = common.finish_build(smolvlm.NAME, smolvlm.TRAINING_VERSION, False, weights, tmp_path / "built", model, processor,
                                 (model.model.vision_model, model.model.connector), smolvlm.DEFAULT_SPEC, None, time.perf_counter())
    return model, record, tmp_path / "built"


def test_build_id_is_recorded_in_the_record_and_the_saved_config(tiny_build):
    from transformers import AutoConfig

    model, record, folder = tiny_build
    assert record["build_id"] == f"smolvlm-ref-{smolvlm.TRAINING_VERSION}+{record['weights_sha256'][:12]}"
    assert record["build_version"] == smolvlm.TRAINING_VERSION
    assert AutoConfig.from_pretrained(folder).hf_dream_reference_build == record["build_id"]
    assert common.cached_build_info(smolvlm.NAME, folder)["build_id"] == record["build_id"]


def test_drafter_records_its_build_and_warns_beside_another(tiny_build, tmp_path):
    model, record, _ = tiny_build
    drafter = hf_dream.DreamDraftModel.from_target(model)
    assert drafter.config.target_build == record["build_id"]
    drafter.save_pretrained(tmp_path / "drafter")
    loaded = hf_dream.DreamDraftModel.from_pretrained(tmp_path / "drafter")
    assert loaded.config.target_build == record["build_id"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded.check_compatible(model)  # same build: silent
    model.config.hf_dream_reference_build = "smolvlm-ref-v9+000000000000"
    with pytest.warns(UserWarning, match=r"smolvlm-ref-v2\+.*smolvlm-ref-v9\+000000000000"):
        loaded.check_compatible(model)


def test_committed_reference_drafters_name_their_build():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "model_cards"
    for name in ("dream-smolvlm-ref", "dream-gemma3-ref"):
        config = json.loads((root / name / "config.json").read_text())
        assert config.get("target_build", "").startswith(name.removeprefix("dream-") + "-v"), name


def test_a_candidate_weights_file_is_loaded_in_place_of_the_committed_one(tmp_path, monkeypatch):
    from hf_dream.reference import load_reference_target

    seen = {}
    monkeypatch.setattr(smolvlm, "load", lambda **kwargs: seen.update(kwargs) or ("model", "processor"))
    with pytest.raises(FileNotFoundError, match="no vision weights at .*candidate.safetensors"):
        load_reference_target("smolvlm-ref", weights_path=tmp_path / "candidate.safetensors")
    assert not seen  # refused before anything loads
    (tmp_path / "candidate.safetensors").write_bytes(b"x")
    assert load_reference_target("smolvlm-ref", weights_path=tmp_path / "candidate.safetensors") == ("model", "processor")
    assert seen["weights_path"] == tmp_path / "candidate.safetensors"
    load_reference_target("smolvlm-ref")
    assert seen["weights_path"] == smolvlm.WEIGHTS_PATH


def test_a_stale_build_is_rebuilt_from_the_weights_asked_for(tiny_build, tmp_path):
    _, record, folder = tiny_build
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"other weights")
    calls = []
    common.ensure_built(smolvlm.NAME, lambda **kwargs: calls.append(kwargs), folder, tmp_path / "w.safetensors", True, print)
    assert calls == []  # built from these weights: kept
    common.ensure_built(smolvlm.NAME, lambda **kwargs: calls.append(kwargs), folder, other, True, print)
    assert [c["weights_path"] for c in calls] == [other]
