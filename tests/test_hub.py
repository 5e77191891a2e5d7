"""Drafters as Hub repositories: cards, pre-upload checks, dry-run and mocked upload, code for
users without hf-dream, and the committed model_cards/ folders."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cached_target
from safetensors.torch import load_file, save_file

from hf_dream import DreamConfig, DreamDraftModel, hub
from hf_dream.cli import build_parser, main
from hf_dream.hub import (
    BASE_TAGS,
    NO_WEIGHTS_STATUS,
    CardValidationError,
    HubFolderError,
    check_folder,
    drafter_parameter_count,
    dream_config_from_target_config,
    export_remote_code,
    push_to_hub,
    render_card,
    validate_card,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_CARDS = REPO_ROOT / "model_cards"
TARGET_ID = "llava-hf/tiny-test-target"  # any valid repo id: nothing is downloaded


def make_drafter(family: str = "llava", **overrides) -> DreamDraftModel:
    drafter = DreamDraftModel.from_target(cached_target(family), target_name_or_path=TARGET_ID, **overrides)
    if drafter.cross_block is not None:
        with torch.no_grad():  # non-zero gates: the cross-attention block must matter in the comparisons
            drafter.cross_block.attn_gate.fill_(0.7)
            drafter.cross_block.mlp_gate.fill_(0.5)
    return drafter.eval()


def write_card(folder: Path, **extra) -> str:
    card = render_card(folder, license="apache-2.0", **extra)
    (folder / "README.md").write_text(str(card))
    return str(card)


@pytest.fixture
def drafter_dir(tmp_path) -> Path:
    """A trained-looking tiny drafter saved as it would be pushed: weights, config, card."""
    folder = tmp_path / "dream-tiny"
    make_drafter().save_pretrained(folder)
    write_card(folder)
    return folder


# --- configs from a target's configuration -------------------------------------------------
def test_config_from_target_config_equals_config_for_target(family):
    target = cached_target(family)
    from_model = DreamDraftModel.config_for_target(target, target_name_or_path=TARGET_ID)
    from_dict = dream_config_from_target_config(target.config.to_dict(), target_name_or_path=TARGET_ID)
    assert from_dict.to_dict() == from_model.to_dict()


def test_parameter_count_on_meta_equals_real_drafter():
    drafter = make_drafter()
    assert drafter_parameter_count(drafter.config) == sum(p.numel() for p in drafter.parameters())


# --- cards -----------------------------------------------------------------------------------
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


def test_eagle_style_drafter_with_reduced_vocabulary_is_carded_and_pushable(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "HfApi", _NoNetwork)
    folder = tmp_path / "eagle-tiny"
    drafter = make_drafter(fusion="concat", draft_vocab_size=64)
    drafter.set_draft_vocab(torch.arange(0, 128, 2))
    drafter.save_pretrained(folder)
    card = write_card(folder)
    assert "EAGLE-style baseline" in card and "reduced draft vocabulary of 64 of the target's 256 tokens" in card
    assert [f["path"] for f in push_to_hub(folder, "someone/eagle-tiny", dry_run=True).files] == [
        "README.md", "config.json", "model.safetensors",
    ]


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


# --- checks and upload -----------------------------------------------------------------------
class _NoNetwork:
    def __init__(self, *args, **kwargs):
        raise AssertionError("HfApi must not be used in a dry run")


def test_push_dry_run_lists_exactly_the_files(drafter_dir, monkeypatch, capsys):
    monkeypatch.setattr(hub, "HfApi", _NoNetwork)
    (drafter_dir / "__pycache__").mkdir()
    (drafter_dir / "__pycache__" / "x.pyc").write_bytes(b"\0")  # never uploaded
    result = push_to_hub(drafter_dir, "someone/dream-tiny", dry_run=True)
    expected = sorted(["README.md", "config.json", "model.safetensors"])
    assert [f["path"] for f in result.files] == expected
    assert [f["size"] for f in result.files] == [(drafter_dir / p).stat().st_size for p in expected]
    assert result.dry_run and result.has_weights and result.commit_url is None
    assert main(["push", "--folder", str(drafter_dir), "--repo-id", "someone/dream-tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload 3 files" in out and all(name in out for name in expected)


def test_push_creates_repo_and_uploads_only_checked_files(drafter_dir, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            return type("CommitInfo", (), {"commit_url": "https://huggingface.co/someone/dream-tiny/commit/abc"})()

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    result = push_to_hub(drafter_dir, "someone/dream-tiny", token="hf_test", private=True)
    assert calls[0] == ("init", "hf_test")
    assert calls[1] == ("create_repo", "someone/dream-tiny", {"repo_type": "model", "private": True, "exist_ok": True})
    upload = calls[2][1]
    assert upload["repo_id"] == "someone/dream-tiny" and upload["folder_path"] == str(drafter_dir)
    assert sorted(upload["allow_patterns"]) == ["README.md", "config.json", "model.safetensors"]
    assert result.commit_url.endswith("/commit/abc")


def _replace_weights(folder: Path, mutate) -> None:
    tensors = load_file(folder / "model.safetensors")
    mutate(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: (d / "pytorch_model.bin").write_bytes(b"pickle"), "pytorch_model.bin: .bin files may hold pickled code"),
        (lambda d: (d / "optimizer.pt").write_bytes(b"pickle"), "optimizer.pt: .pt files"),
        (lambda d: _replace_weights(d, lambda t: t.update({"embed_tokens.weight": torch.zeros(256, 64)})), "target weights"),
        (lambda d: _replace_weights(d, lambda t: t.update({"lm_head.weight": torch.zeros(256, 64)})), "target weights"),
        (lambda d: _replace_weights(d, lambda t: t.update({"extra.weight": torch.zeros(256, 64)})), "vocabulary-sized tensors"),
        (lambda d: _replace_weights(d, lambda t: t.update({"norm.weight": torch.zeros(65)})), "shapes differ"),
        (lambda d: _replace_weights(d, lambda t: t.pop("norm.weight")), "missing for this config"),
        (lambda d: (d / "model.safetensors").open("ab").write(b"\0" * 16), "bytes on disk"),
        (lambda d: (d / "README.md").unlink(), "README.md (the model card) is missing"),
        (lambda d: (d / "notes.docx").write_bytes(b"x"), "unexpected file type"),
        (lambda d: (d / "helper.py").write_text("import os\n"), "not written by export_remote_code"),
        (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "llava"})), "not a DreamConfig"),
    ],
    ids=["bin", "pt", "embed", "lm_head", "vocab-sized", "shape", "missing", "trailing-bytes", "no-card",
         "unknown-file", "stray-code", "not-dream"],
)
def test_push_refuses_unsafe_or_inconsistent_folders(drafter_dir, monkeypatch, breakage, message, capsys):
    monkeypatch.setattr(hub, "HfApi", _NoNetwork)
    breakage(drafter_dir)
    with pytest.raises(HubFolderError) as error:
        push_to_hub(drafter_dir, "someone/dream-tiny", dry_run=True)
    assert any(message in problem for problem in error.value.problems), error.value.problems
    assert main(["push", "--folder", str(drafter_dir), "--repo-id", "someone/dream-tiny", "--dry-run"]) == 2
    assert message in capsys.readouterr().err


# --- code for users without hf-dream ---------------------------------------------------------
ISOLATED_LOAD = r'''
import sys


class BlockHfDream:
    """Makes hf_dream unimportable in this process, as on a machine where it is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "hf_dream" or name.startswith("hf_dream."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)")
        return None


sys.meta_path.insert(0, BlockHfDream())
assert "hf_dream" not in sys.modules
try:
    import hf_dream  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("hf_dream is importable here: the test would prove nothing")

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForImageTextToText

drafter_dir, target_dir, inputs_path, out_path = sys.argv[1:5]
torch.set_num_threads(1)
drafter = AutoModel.from_pretrained(drafter_dir, trust_remote_code=True).eval()
target = AutoModelForImageTextToText.from_pretrained(target_dir).eval()
drafter.attach_target(target)
inputs = load_file(inputs_path)
with torch.no_grad():
    out = drafter(inputs_embeds=inputs["inputs_embeds"], position_ids=inputs["position_ids"], target_features=inputs["target_features"])
save_file({"logits": out.logits.contiguous()}, out_path)
print(type(drafter).__module__)
print(sorted(name for name in sys.modules if name.startswith("hf_dream")))
'''


def test_remote_code_loads_without_hf_dream_with_identical_logits(drafter_dir, tmp_path, monkeypatch):
    from transformers import AutoModel

    monkeypatch.setattr(hub, "HfApi", _NoNetwork)
    target = cached_target("llava")
    target.save_pretrained(tmp_path / "target")
    written = export_remote_code(drafter_dir)
    assert sorted(p.name for p in written) == ["configuration_dream.py", "modeling_dream.py", "targets.py"]
    config = json.loads((drafter_dir / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamDraftModel"}
    exported = {p.stem for p in written}
    for path in written:  # self-contained: no hf_dream imports, relative imports only of exported siblings
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("hf_dream")
                assert node.level == 0 or (node.level == 1 and node.module in exported)
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("hf_dream") for alias in node.names)

    # With hf_dream installed, the package's class is used (no trust_remote_code needed).
    assert type(AutoModel.from_pretrained(drafter_dir)) is DreamDraftModel

    drafter = DreamDraftModel.from_pretrained(drafter_dir).eval()
    drafter.attach_target(target)
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "inputs_embeds": torch.randn(1, 7, drafter.config.hidden_size, generator=generator),
        "target_features": torch.randn(1, 7, drafter.config.hidden_size, generator=generator),
        "position_ids": torch.arange(7)[None],
    }
    save_file(inputs, tmp_path / "inputs.safetensors")
    with torch.no_grad():
        expected = drafter(**inputs).logits

    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    script = tmp_path / "isolated_load.py"
    script.write_text(ISOLATED_LOAD)
    completed = subprocess.run(
        [sys.executable, str(script), str(drafter_dir), str(tmp_path / "target"), str(tmp_path / "inputs.safetensors"), str(tmp_path / "out.safetensors")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    module, loaded = completed.stdout.strip().splitlines()[-2:]
    assert module.startswith("transformers_modules.") and module.endswith(".modeling_dream")
    assert loaded == "[]"
    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["logits"], expected, rtol=0, atol=0)

    # The exported folder is still pushable; a hand-edited code file is not.
    assert {f["path"] for f in check_folder(drafter_dir)} >= {"modeling_dream.py", "configuration_dream.py", "targets.py"}
    card = str(render_card(drafter_dir, license="apache-2.0"))
    assert "trust_remote_code=True" in card and "configuration_dream.py, modeling_dream.py, targets.py" in card
    modeling = drafter_dir / "modeling_dream.py"
    modeling.write_text(modeling.read_text().split("\n", 1)[1])
    with pytest.raises(HubFolderError, match="not written by export_remote_code"):
        check_folder(drafter_dir)


# --- the committed model_cards/ folders ------------------------------------------------------
CARD_FOLDERS = sorted(path.parent for path in MODEL_CARDS.glob("*/target_config.json"))


def test_model_cards_cover_every_planned_target():
    targets = {json.loads((folder / "target_config.json").read_text())["repo_id"] for folder in CARD_FOLDERS}
    assert targets == {
        "llava-hf/llava-1.5-7b-hf", "llava-hf/llava-v1.6-vicuna-7b-hf", "llava-hf/llava-v1.6-vicuna-13b-hf",
        "mistral-community/pixtral-12b", "HuggingFaceTB/SmolVLM-256M-Instruct", "HuggingFaceTB/SmolVLM-Instruct",
        "google/gemma-3-4b-it", "google/gemma-3-12b-it",
    }


@pytest.mark.parametrize("folder", CARD_FOLDERS, ids=[f.name for f in CARD_FOLDERS])
def test_model_card_folder_is_consistent_and_pushable(folder, monkeypatch):
    monkeypatch.setattr(hub, "HfApi", _NoNetwork)
    record = json.loads((folder / "target_config.json").read_text())
    text = record["config"]["text_config"]
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


def test_card_cli_writes_and_checks(drafter_dir, tmp_path, capsys):
    out = tmp_path / "card.md"
    args = ["card", "--drafter", str(drafter_dir), "--out", str(out), "--license", "apache-2.0"]
    assert main(args) == 0
    assert validate_card(out.read_text())["license"] == "apache-2.0"
    assert main([*args, "--check"]) == 0
    out.write_text(out.read_text() + "hand edit\n")
    assert main([*args, "--check"]) == 1
    assert "is not the card hf-dream renders now" in capsys.readouterr().err


REFERENCE_CARD_FOLDERS = [REPO_ROOT / "model_cards" / name for name in ("dream-smolvlm-ref", "dream-gemma3-ref")]


@pytest.mark.parametrize("folder", REFERENCE_CARD_FOLDERS, ids=[f.name for f in REFERENCE_CARD_FOLDERS])
def test_reference_drafter_folders_are_pushable_and_their_cards_current(folder, monkeypatch):
    """The trained reference drafters: weights present, the card names the text model's Hub repo as base_model,
    and the card is exactly what `hf-dream card` renders from the committed config, training record and bench JSON."""
    from hf_dream.reference import REFERENCE_BASE_MODELS

    monkeypatch.setattr(hub, "HfApi", _NoNetwork)
    result = push_to_hub(folder, f"hf-dream/{folder.name}", dry_run=True)
    assert result.has_weights
    assert [f["path"] for f in result.files] == ["README.md", "config.json", "model.safetensors", "training.json"]
    config = DreamConfig.from_pretrained(folder)
    name = config.target_name_or_path.split(":", 1)[1]
    card = (folder / "README.md").read_text()
    assert f"base_model: {REFERENCE_BASE_MODELS[name]}" in card
    bench = REPO_ROOT / "benchmarks" / "reference" / name
    from hf_dream.cli import main

    license_id = "gemma" if name == "gemma3-ref" else "apache-2.0"
    results = [arg for name in ("results-T0", "results-T1", "adaptive-T0", "adaptive-T1") for arg in ("--bench", str(bench / f"{name}.json"))]
    assert main(["card", "--drafter", str(folder), *results, "--out", str(folder / "README.md"), "--license", license_id, "--check"]) == 0
