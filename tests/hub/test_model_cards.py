"""The committed model_cards/ folders: consistent, pushable, current; the reference drafters also ship in the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from hub_helpers import MODEL_CARDS, REPO_ROOT, no_network

from hf_dream import DreamConfig
from hf_dream.cli import build_parser
from hf_dream.hub import NO_WEIGHTS_STATUS, dream_config_from_target_config, push_to_hub
from hf_dream.targets import TARGET_ADAPTERS

CARD_FOLDERS = sorted(path.parent for path in MODEL_CARDS.glob("*/target_config.json"))


def test_model_cards_cover_every_planned_target():
    targets = {json.loads((folder / "target_config.json").read_text())["repo_id"] for folder in CARD_FOLDERS}
    assert targets == {
        "llava-hf/llava-1.5-7b-hf", "llava-hf/llava-v1.6-vicuna-7b-hf", "llava-hf/llava-v1.6-vicuna-13b-hf",
        "mistral-community/pixtral-12b", "HuggingFaceTB/SmolVLM-256M-Instruct", "HuggingFaceTB/SmolVLM-Instruct",
        "google/gemma-3-4b-it", "google/gemma-3-12b-it", "mistralai/Mistral-Small-3.1-24B-Instruct-2503",
        "llava-hf/llava-onevision-qwen2-7b-ov-hf", "OpenGVLab/InternVL3-8B-hf",
        "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen3-VL-8B-Instruct",
    }


@pytest.mark.parametrize("folder", CARD_FOLDERS, ids=[f.name for f in CARD_FOLDERS])
def test_model_card_folder_is_consistent_and_pushable(folder, monkeypatch):
    no_network(monkeypatch)
    record = json.loads((folder / "target_config.json").read_text())
    text = record["config"].get("text_config", record["config"])  # Qwen2.5-VL's published config is flat
    config = DreamConfig.from_pretrained(folder)
    assert config.hidden_size == text["hidden_size"]
    assert config.vocab_size == text["vocab_size"]
    assert config.target_name_or_path == record["repo_id"]
    assert config.target_num_hidden_layers == text["num_hidden_layers"]
    image_token = record["config"].get("image_token_index", record["config"].get("image_token_id"))
    assert config.target_image_token_id == image_token
    assert config.to_dict() | {"architectures": None} == dream_config_from_target_config(
        record["config"], target_name_or_path=record["repo_id"]
    ).to_dict() | {"architectures": None}
    assert record["source"].startswith(f"https://huggingface.co/{record['repo_id']}/")
    assert record["provenance"] and isinstance(record["unverified"], list)
    assert record["config"]["model_type"] in TARGET_ADAPTERS, f"{folder.name}: no adapter for its family"

    result = push_to_hub(folder, f"hf-dream/{folder.name}", dry_run=True)
    assert not result.has_weights
    assert [f["path"] for f in result.files] == ["README.md", "config.json", "target_config.json", "train.yaml"]
    card = (folder / "README.md").read_text()
    assert f"STATUS: {NO_WEIGHTS_STATUS}" in card and "Estimates, not measurements" in card

    # train.yaml is a runnable `hf-dream train --config` file with the paper's batch and steps
    options = yaml.safe_load((folder / "train.yaml").read_text())
    train_parser = build_parser().subcommands["train"]
    known = {action.dest for action in train_parser._actions}
    assert set(options) <= known, set(options) - known
    assert options["target"] == record["repo_id"] and options["max_steps"] == 68_000
    assert options["per_device_train_batch_size"] * 2 == 4 and isinstance(options["learning_rate"], float)


def test_committed_model_cards_are_what_generate_py_writes():
    completed = subprocess.run(
        [sys.executable, str(MODEL_CARDS / "generate.py"), "--check"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]



REFERENCE_CARD_FOLDERS = [REPO_ROOT / "model_cards" / name for name in ("dream-smolvlm-ref", "dream-gemma3-ref")]
# the `hf-dream bench` JSON each reference card is rendered from (under benchmarks/reference/): the build the drafter
# was trained for (smolvlm-ref: v2; gemma3-ref: still v1)
REFERENCE_CARD_BENCHMARKS = {
    "smolvlm-ref": [f"smolvlm-ref/first-drafter-{name}.json" for name in ("scenes-T0", "photos-T0")],
    "gemma3-ref": [f"gemma3-ref/{name}.json" for name in ("results-T0", "results-T1", "adaptive-T0", "adaptive-T1")],
}


@pytest.mark.parametrize("folder", REFERENCE_CARD_FOLDERS, ids=[f.name for f in REFERENCE_CARD_FOLDERS])
def test_reference_drafter_folders_are_pushable_and_their_cards_current(folder, monkeypatch):
    """The trained reference drafters: weights present, the card names the text model's Hub repo as base_model,
    and the card is exactly what `hf-dream card` renders from the committed config, training record and bench JSON."""
    from hf_dream.reference import REFERENCE_BASE_MODELS

    no_network(monkeypatch)
    result = push_to_hub(folder, f"hf-dream/{folder.name}", dry_run=True)
    assert result.has_weights
    assert [f["path"] for f in result.files] == ["README.md", "config.json", "model.safetensors", "training.json"]
    config = DreamConfig.from_pretrained(folder)
    name = config.target_name_or_path.split(":", 1)[1]
    card = (folder / "README.md").read_text()
    assert f"base_model: {REFERENCE_BASE_MODELS[name]}" in card
    from hf_dream.cli import main

    license_id = "gemma" if name == "gemma3-ref" else "apache-2.0"
    results = [arg for path in REFERENCE_CARD_BENCHMARKS[name] for arg in ("--bench", str(REPO_ROOT / "benchmarks" / "reference" / path))]
    assert main(["card", "--drafter", str(folder), *results, "--out", str(folder / "README.md"), "--license", license_id, "--check"]) == 0


@pytest.mark.parametrize("folder", REFERENCE_CARD_FOLDERS, ids=[f.name for f in REFERENCE_CARD_FOLDERS])
def test_packaged_reference_drafter_is_the_committed_one(folder):
    """`hf-dream demo` after `pip install` runs the copy shipped in the package: byte for byte the committed folder
    (git stores the identical files once)."""
    import hashlib

    from hf_dream.reference import reference_drafter_dir

    name = DreamConfig.from_pretrained(folder).target_name_or_path.split(":", 1)[1]
    packaged = reference_drafter_dir(name)
    assert packaged.name == folder.name
    committed = sorted(p.name for p in folder.iterdir() if p.is_file())
    assert sorted(p.name for p in packaged.iterdir()) == committed
    for file_name in committed:
        digests = {hashlib.sha256((root / file_name).read_bytes()).hexdigest() for root in (folder, packaged)}
        assert len(digests) == 1, (
            f"{packaged / file_name} differs from {folder / file_name}: after retraining or re-carding, "
            f"copy it over (cp {folder.relative_to(REPO_ROOT)}/* {packaged.relative_to(REPO_ROOT)}/)"
        )
