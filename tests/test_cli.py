"""The `hf-dream` command line."""

from __future__ import annotations

import json
import re

import pytest

from hf_dream.cli import COMMANDS, build_parser, main


def test_demo_reports_identical_output_and_stats(capsys):
    assert main(["demo", "--tiny", "gemma3", "--max-new-tokens", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["identical"] is True
    assert result["plain_answer"] == result["dream_answer"] and len(result["plain_answer"]) == 16
    assert result["stats"]["new_tokens"] == 16 and result["stats"]["target_passes"] >= 1


def test_demo_decoding_options_go_to_generate(capsys, monkeypatch):
    """`--num-draft-tokens` / `--draft-schedule` are this run's generate() keywords, not config edits."""
    from transformers.generation import GenerationMixin

    seen = []
    generate = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        if "assistant_model" in kwargs:
            seen.append({k: kwargs.get(k) for k in ("num_draft_tokens", "draft_schedule")})
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    assert main(["demo", "--tiny", "llava", "--max-new-tokens", "8", "--num-draft-tokens", "2", "--draft-schedule", "heuristic", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["identical"] is True
    assert seen == [{"num_draft_tokens": 2, "draft_schedule": "heuristic"}]


def test_demo_uses_the_drafter_shipped_in_the_package_from_any_directory(tmp_path, monkeypatch):
    """B9: the reference drafter was looked up in the checkout (`parents[1] / "model_cards"`), so `hf-dream demo` failed
    after `pip install`; it is package data now."""
    from pathlib import Path

    import hf_dream
    from hf_dream.cli import demo_drafter_source

    monkeypatch.chdir(tmp_path)
    for reference in ("smolvlm-ref", "gemma3-ref"):
        folder = demo_drafter_source(build_parser().parse_args(["demo", "--reference", reference]))
        assert folder.is_relative_to(Path(hf_dream.__file__).parent) and (folder / "model.safetensors").is_file()
        assert folder.name == f"dream-{reference}"


def test_demo_drafter_option(tmp_path, capsys):
    from hf_dream import DreamDraftModel
    from hf_dream.testing import build_tiny_target

    folder = tmp_path / "my-drafter"
    DreamDraftModel.from_target(build_tiny_target("llava", seed=0)).save_pretrained(folder)
    assert main(["demo", "--tiny", "llava", "--drafter", str(folder), "--max-new-tokens", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["drafter"] == str(folder) and result["identical"] is True


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "missing", "no such drafter folder"),
    (lambda tmp: tmp, "no config.json in that folder"),
], ids=["missing", "no-config"])
def test_demo_refuses_a_bad_drafter_before_loading_the_target(tmp_path, monkeypatch, make, message):
    def no_target(*args, **kwargs):
        raise AssertionError("the reference target must not be loaded for a bad --drafter")

    monkeypatch.setattr("hf_dream.reference.load_reference_target", no_target)
    with pytest.raises(SystemExit, match=message):
        main(["demo", "--drafter", str(make(tmp_path))])


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_documents_its_options(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.strip()
    flat = " ".join(text.split())
    assert not re.search(r"\(default: [^)]*\) \(default:", flat), "a default is shown twice"
    assert "(default: None)" not in flat and "(default: [])" not in flat
    for action in build_parser()._subparsers._group_actions[0].choices[name]._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{name} {action.option_strings} has no help text"
