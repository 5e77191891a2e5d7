"""hf_dream.hub.cards: model cards rendered from a drafter folder's files, and their validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import cached_target
from hub_helpers import TARGET_ID, make_drafter, saved_drafter, write_card

from hf_dream import DreamConfig, DreamDraftModel
from hf_dream.cli import main
from hf_dream.hub import BASE_TAGS, NO_WEIGHTS_STATUS, CardValidationError, drafter_parameter_count, render_card, validate_card


@pytest.fixture
def drafter_dir(tmp_path) -> Path:
    return saved_drafter(tmp_path)


def test_card_metadata_and_status_without_weights(tmp_path):
    folder = tmp_path / "dream-config-only"
    make_drafter().config.save_pretrained(folder)
    card = write_card(folder)
    metadata = validate_card(card)
    assert metadata["library_name"] == "hf-dream"
    assert metadata["base_model"] == TARGET_ID
    assert metadata["pipeline_tag"] == "image-text-to-text"
    assert metadata["license"] == "apache-2.0"
    assert set(BASE_TAGS) <= set(metadata["tags"]) and "llava" in metadata["tags"]
    assert f"STATUS: {NO_WEIGHTS_STATUS}" in card
    assert "weights included" not in card
    assert f"{drafter_parameter_count(DreamConfig.from_pretrained(folder)):,}" in card
    assert 'DreamDraftModel.from_pretrained("hf-dream/dream-config-only")' in card
    assert "No measurements yet" in card


def test_card_status_with_weights_and_training_record(drafter_dir):
    card = (drafter_dir / "README.md").read_text()
    assert "STATUS: weights included (model.safetensors), but no training.json" in card
    assert NO_WEIGHTS_STATUS not in card
    training = {
        "command": "torchrun --nproc_per_node 2 -m hf_dream train --config train.yaml",
        "data": "data/tiny (1,234 regenerated responses)",
        "steps": 4321,
        "hardware": "2x A100-80GB",
        "wall_time": "5 h 43 min",
    }
    (drafter_dir / "training.json").write_text(json.dumps(training))
    card = str(render_card(drafter_dir, license="apache-2.0"))
    assert "STATUS: trained weights included (model.safetensors)" in card
    for key, value in training.items():
        assert str(value) in card, key
    assert "Not trained yet" not in card and "Estimates, not measurements" not in card



def test_results_table_is_generated_from_bench_json(drafter_dir, tmp_path):
    from hf_dream.evaluation import benchmark, build_methods
    from hf_dream.testing import make_tiny_inputs

    target = cached_target("llava")
    drafter = DreamDraftModel.from_pretrained(drafter_dir)
    drafter.attach_target(target)
    methods = build_methods(["ar", "dream"], {"dream": drafter})
    result = benchmark(target, [make_tiny_inputs(target, seed=3)], methods, 6, warmup=False, show_progress=False)
    result["settings"] = {
        "target": "tiny:llava", "temperature": 0.0, "max_new_tokens": 6, "num_prompts": 1,
        "command": "hf-dream bench --target tiny:llava --drafter dream-tiny --max-new-tokens 6",
        "machine": {"cpu": "Test CPU 9000", "torch": torch.__version__, "torch_threads": 1}, "date": "2031-02-03",
    }
    path = tmp_path / "bench-tiny.json"
    path.write_text(json.dumps(result))
    card = str(render_card(drafter_dir, [path], license="apache-2.0"))
    for name, entry in result["summary"].items():
        tau = f"{entry['acceptance_length']:.2f}"
        row = f"| {name} | {tau} | {entry['speedup_median']:.2f}x | {entry['tokens_per_second_median']:.1f} | yes |"
        assert row in card
    assert "**bench-tiny.json**" in card and "T=0.0" in card and "2031-02-03" in card and "Test CPU 9000" in card
    assert f"Command: `{result['settings']['command']}`" in card
    assert "No measurements yet" not in card and "Note:" not in card

    result["summary"]["dream"]["identical_to_ar"] = False  # a broken run is reported, never hidden
    result["settings"]["target"] = "someone/other-target"
    card = str(render_card(drafter_dir, [result], license="apache-2.0"))
    assert "CORRECTNESS FAILURE: greedy output differed from plain decoding for dream" in card
    assert f"measured on someone/other-target, not on this drafter's target {TARGET_ID}" in card
    assert "**benchmark 1**" in card and "| **NO** |" in card


def test_validate_card_rejects_incomplete_metadata(tmp_path):
    folder = tmp_path / "dream-x"
    make_drafter().config.save_pretrained(folder)
    without_license = str(render_card(folder))  # the folder records no license
    with pytest.raises(CardValidationError, match="license"):
        validate_card(without_license)
    with pytest.raises(CardValidationError, match="no YAML"):
        validate_card("# a card without metadata\n")
    with pytest.raises(CardValidationError, match="base_model"):
        validate_card("---\nlibrary_name: hf-dream\nbase_model: not a repo\n---\ntext\n")



def test_card_cli_writes_and_checks(drafter_dir, tmp_path, capsys):
    out = tmp_path / "card.md"
    args = ["card", "--drafter", str(drafter_dir), "--out", str(out), "--license", "apache-2.0"]
    assert main(args) == 0
    assert validate_card(out.read_text())["license"] == "apache-2.0"
    assert main([*args, "--check"]) == 0
    out.write_text(out.read_text() + "hand edit\n")
    assert main([*args, "--check"]) == 1
    assert "is not the card hf-dream renders now" in capsys.readouterr().err
