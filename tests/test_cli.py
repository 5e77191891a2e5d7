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


def _target_must_not_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the target was loaded before the input was checked")

    monkeypatch.setattr("hf_dream.loading.load_target", refuse)


def test_a_failure_is_one_line_and_a_nonzero_exit(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_DREAM_DEBUG", raising=False)
    _target_must_not_load(monkeypatch)
    argv = ["bench", "--target", "smolvlm-reff", "--prompts", str(tmp_path / "p.jsonl")]
    monkeypatch.setattr("sys.argv", ["hf-dream", *argv])
    assert main() == 1  # as the installed command runs it
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("hf-dream bench: error: target 'smolvlm-reff': no such folder") and "valid target specs" in err
    assert "--debug" in err
    for debug in (["hf-dream", "--debug", *argv], ["hf-dream", *argv, "--debug"]):
        monkeypatch.setattr("sys.argv", debug)
        with pytest.raises(ValueError, match="valid target specs"):
            main()
    monkeypatch.setattr("sys.argv", ["hf-dream", *argv])
    monkeypatch.setenv("HF_DREAM_DEBUG", "1")
    with pytest.raises(ValueError, match="valid target specs"):
        main()


def test_bench_checks_limit_drafters_and_images_before_loading_the_target(tmp_path, monkeypatch):
    _target_must_not_load(monkeypatch)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"image": "cat.png", "prompt": "q"}) + "\n")
    base = ["bench", "--target", "reference:smolvlm-ref", "--prompts", str(prompts)]
    with pytest.raises(SystemExit, match="--limit must be at least 1, got 0"):
        main([*base, "--limit", "0"])
    with pytest.raises(FileNotFoundError, match="Drafter folder not found: /tmp/does_not_exist"):
        main([*base, "--drafter", "/tmp/does_not_exist"])
    with pytest.raises(FileNotFoundError, match=r"p.jsonl:1: image not found"):
        main(base)


def test_prepare_data_finds_a_missing_image_before_loading_the_target(tmp_path, monkeypatch):
    _target_must_not_load(monkeypatch)
    (tmp_path / "cat.png").write_bytes(b"")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"image": name, "prompt": "q"}) + "\n" for name in ["cat.png"] * 35 + ["catt.png"]))
    with pytest.raises(FileNotFoundError, match=r"p.jsonl:36: image not found: .*catt.png"):
        main(["prepare-data", "--target", "smolvlm-ref", "--prompts", str(prompts), "--output", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--limit must be at least 1"):
        main(["prepare-data", "--target", "tiny:llava", "--prompts", str(prompts), "--output", str(tmp_path / "o"), "--limit", "0"])


def test_card_without_a_licence_names_the_option(tmp_path):
    from hf_dream import DreamConfig

    DreamConfig(hidden_size=64, num_attention_heads=4, vocab_size=100, target_name_or_path="someone/target").save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match="pass --license ID"):
        main(["card", "--drafter", str(tmp_path)])


def test_the_newcomers_walk_from_prompts_to_a_pushable_drafter(tmp_path, monkeypatch, capsys):
    """prepare-data -> train -> card -> push --dry-run on a tiny target, through the CLI as a new user runs it:
    the trained drafter folder holds no pickle (`training_args.bin`), `card` names the option that supplies the
    missing licence (and, for a target without a Hub id, the base model), and the dry run lists exactly the folder's safe files without touching the Hub."""

    class NoHub:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a dry run must not reach the Hub")

    monkeypatch.setattr("hf_dream.hub.push.HfApi", NoHub)
    (tmp_path / "cat.png").write_bytes(b"")  # tiny targets never open their images
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"image": "cat.png", "prompt": f"Describe picture {i}."}) + "\n" for i in range(4)))
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["prepare-data", "--target", "tiny:llava", "--prompts", str(prompts), "--output", str(data), "--max-new-tokens", "6"]) == 0
    assert main([
        "train", "--target", "tiny:llava", "--dataset", str(data), "--output_dir", str(run), "--eval_size", "1", "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
        "--acceptance_eval_samples", "1",
    ]) == 0
    drafter = run / "drafter"
    assert (drafter / "model.safetensors").is_file() and not (drafter / "training_args.bin").exists()
    with pytest.raises(SystemExit, match="pass --license ID"):
        main(["card", "--drafter", str(drafter)])
    with pytest.raises(SystemExit, match="its target 'tiny:llava' is not a Hub repo id; pass --base-model OWNER/NAME"):
        main(["card", "--drafter", str(drafter), "--license", "apache-2.0"])
    assert main(["card", "--drafter", str(drafter), "--license", "apache-2.0", "--base-model", "someone/tiny-llava"]) == 0
    capsys.readouterr()
    assert main(["push", "--folder", str(drafter), "--repo-id", "someone/dream-tiny-llava", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    files = sorted(path.name for path in drafter.iterdir())
    assert f"would upload {len(files)} files" in listed and all(name in listed for name in files)
    assert "README.md" in files and not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
