"""`hf-dream prepare-data`, `train` (with a YAML config) and `calibrate` on a tiny target."""

from __future__ import annotations

import json

import pytest

from hf_dream import DreamDraftModel
from hf_dream.cli import main
from hf_dream.training import DreamTrainer


@pytest.fixture
def prompts(tmp_path):
    lines = [{"image": f"img{i}.png", "prompt": f"Describe picture number {i}."} for i in range(6)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_prepare_train_calibrate(tmp_path, prompts, capsys, monkeypatch):
    data = tmp_path / "data"
    assert main(["prepare-data", "--target", "tiny:gemma3", "--prompts", str(prompts), "--output", str(data), "--max-new-tokens", "24", "--shard-size", "4"]) == 0
    assert "6 examples" in capsys.readouterr().out

    config = tmp_path / "train.yaml"
    config.write_text(
        "target: tiny:gemma3\n"
        f"dataset: {data}\n"
        "eval_size: 2\n"
        f"output_dir: {tmp_path / 'run'}\n"
        "max_steps: 4\nper_device_train_batch_size: 2\nlearning_rate: 0.001\n"
        "use_cpu: true\nreport_to: none\nsave_strategy: 'no'\ndisable_tqdm: true\nacceptance_eval_samples: 1\n"
    )
    # a command-line option overrides the config file
    with pytest.raises(ValueError, match="--entropy_layers must be 'all' or target layers in 1..1"):
        main(["train", "--config", str(config), "--entropy_layers", "5"])
    assert main(["train", "--config", str(config), "--visual_keep_ratio", "0.5", "--intermediate_size", "24", "--entropy_layers", "all"]) == 0
    assert not (tmp_path / "run" / "drafter" / "training_args.bin").exists()  # `hf-dream push` refuses pickles
    drafter = DreamDraftModel.from_pretrained(tmp_path / "run" / "drafter")
    assert drafter.config.visual_keep_ratio == 0.5 and drafter.config.target_model_type == "gemma3"
    assert drafter.config.intermediate_size == 24 and drafter.final_block.mlp.up_proj.out_features == 24
    assert drafter.config.entropy_candidate_layers == [1]  # 'all' on a 2-layer target
    assert drafter.config.target_name_or_path == "tiny:gemma3"
    # the final weights are evaluated once: by the run's own schedule when it ends on an eval step, else after it
    steps_evaluated = []
    original = DreamTrainer.evaluate

    def counting_evaluate(self, *args, **kwargs):
        steps_evaluated.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DreamTrainer, "evaluate", counting_evaluate)
    assert main(["train", "--config", str(config), "--eval_strategy", "steps", "--eval_steps", "2", "--cross_attention_rope", "true"]) == 0
    assert DreamDraftModel.from_pretrained(tmp_path / "run" / "drafter").config.cross_attention_rope is True
    assert main(["train", "--config", str(config), "--eval_strategy", "steps", "--eval_steps", "3"]) == 0
    assert steps_evaluated == [2, 4, 3, 4]
    # the EAGLE-3 baseline: concat fusion over several target layers, trained with training-time test; it saves and loads
    assert main(["train", "--config", str(config), "--fusion", "concat", "--feature_layers", "eagle3", "--ttt_steps", "2"]) == 0
    eagle3 = DreamDraftModel.from_pretrained(tmp_path / "run" / "drafter")
    assert eagle3.config.feature_layers == [1, 2] and eagle3.feature_fusion.in_features == 2 * eagle3.config.hidden_size

    # early stopping: with nothing to learn (lr 0) the held-out loss stalls, and the run stops at its second evaluation
    # (the steps are read off the curve; --max_steps is a ceiling); teacher signals from a cache on the way
    with pytest.raises(ValueError, match="saving must follow evaluation"):
        main(["train", "--config", str(config), "--early_stopping_patience", "1", "--eval_strategy", "steps", "--eval_steps", "1"])
    steps_evaluated.clear()
    stopping = ["--early_stopping_patience", "1", "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "steps",
                "--save_steps", "1", "--max_steps", "6", "--learning_rate", "0", "--teacher_cache_dir", str(tmp_path / "cache")]  # fmt: skip
    assert main(["train", "--config", str(config), *stopping]) == 0
    assert steps_evaluated == [1, 2]
    assert any((tmp_path / "cache").glob("*/shard-*.safetensors"))

    assert main(["calibrate", "--target", "tiny:gemma3", "--dataset", str(data), "--out", str(tmp_path / "cal"), "--all-layers"]) == 0
    report = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert report["candidate_layers"] == [1] and report["response_tokens"] > 0
    assert sum(report["counts"].values()) == report["response_tokens"]
    assert (tmp_path / "cal" / "calibration.png").stat().st_size > 1000


def test_bad_inputs_are_named(tmp_path, prompts):
    with pytest.raises(SystemExit, match="missing --output"):
        main(["prepare-data", "--target", "tiny:llava", "--prompts", str(prompts)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: .*'prompt'"):
        main(["prepare-data", "--target", "tiny:llava", "--prompts", str(bad), "--output", str(tmp_path / "o")])
    config = tmp_path / "c.yaml"
    config.write_text("target: tiny:llava\nlearning_rat: 0.1\n")
    with pytest.raises(SystemExit):
        main(["train", "--config", str(config)])
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        main(["train", "--target", "tiny:llava", "--dataset", str(tmp_path / "nothing"), "--use_cpu", "--report_to", "none"])


def test_shipped_training_configs_name_real_options():
    from pathlib import Path

    import yaml

    import hf_dream
    from hf_dream.cli import build_parser

    configs = Path(hf_dream.__file__).parent / "training" / "configs"
    train = build_parser().subcommands["train"]
    known = {action.dest for action in train._actions}
    recipes = sorted(Path(__file__).parents[2].glob("benchmarks/reference/*/train*.yaml"))  # the benchmarks' drafters
    assert recipes
    for path in [*configs.glob("train_*.yaml"), *recipes]:
        options = yaml.safe_load(path.read_text())
        assert set(options) <= known, (path.name, set(options) - known)
    accelerate = yaml.safe_load((configs / "accelerate_fsdp2.yaml").read_text())
    assert accelerate["distributed_type"] == "FSDP" and accelerate["fsdp_config"]["fsdp_version"] == 2
    assert "DreamCrossAttentionBlock" in accelerate["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]


def test_train_checks_the_dataset_before_loading_the_target(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the target was loaded before the dataset was checked")

    monkeypatch.setattr("hf_dream.loading.load_target", refuse)
    common = ["--use_cpu", "--report_to", "none", "--output_dir", str(tmp_path / "run")]
    with pytest.raises(FileNotFoundError, match="No prepared dataset"):
        main(["train", "--target", "tiny:llava", "--dataset", str(tmp_path / "nope"), *common])
    with pytest.raises(ValueError, match="valid target specs"):
        main(["train", "--target", "smolvlm-reff", "--dataset", str(tmp_path / "nope"), *common])
    with pytest.raises(ValueError, match="--feature_layers must be 'eagle3' or a comma list"):
        main(["train", "--target", "tiny:llava", "--dataset", str(tmp_path / "nope"), "--feature_layers", "low,high", *common])


def test_train_refuses_a_dataset_prepared_for_another_target(tmp_path, prompts):
    data = tmp_path / "data"
    assert main(["prepare-data", "--target", "tiny:llava", "--prompts", str(prompts), "--output", str(data), "--max-new-tokens", "4"]) == 0
    with pytest.raises(ValueError, match="was prepared with tiny:llava, not with --target tiny:idefics3"):
        main(["train", "--target", "tiny:idefics3", "--dataset", str(data), "--use_cpu", "--report_to", "none", "--output_dir", str(tmp_path / "run")])


@pytest.mark.parametrize("family", ["mistral3", "llava_onevision", "internvl", "gemma4"])
def test_a_later_family_trains_end_to_end(tmp_path, prompts, family):
    """`prepare-data`, `calibrate`, a few `train` steps, then the trained drafter decodes exactly as the target alone."""
    import torch

    from hf_dream.loading import load_target
    from hf_dream.testing import make_tiny_inputs

    target_spec, data, run = f"tiny:{family}", tmp_path / "data", tmp_path / "run"
    assert main(["prepare-data", "--target", target_spec, "--prompts", str(prompts), "--output", str(data), "--max-new-tokens", "12"]) == 0
    assert main(["calibrate", "--target", target_spec, "--dataset", str(data), "--out", str(tmp_path / "cal"), "--all-layers"]) == 0
    assert json.loads((tmp_path / "cal" / "calibration.json").read_text())["response_tokens"] > 0
    common = ["--use_cpu", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"]
    assert main(["train", "--target", target_spec, "--dataset", str(data), "--output_dir", str(run), "--max_steps", "3",
                 "--per_device_train_batch_size", "2", "--entropy_layers", "all", *common]) == 0
    drafter = DreamDraftModel.from_pretrained(run / "drafter")
    assert drafter.config.target_model_type == family and drafter.config.target_name_or_path == target_spec

    target, _ = load_target(target_spec)
    inputs = make_tiny_inputs(target, seed=3, image_first=True, text_len_before=0)
    greedy = dict(max_new_tokens=12, do_sample=False)
    output = target.generate(**inputs, assistant_model=drafter, **greedy)
    assert torch.equal(output, target.generate(**inputs, **greedy))
    assert drafter.last_stats["new_tokens"] == output.shape[1] - inputs["input_ids"].shape[1] > 0


@pytest.mark.parametrize("family, candidates", [("qwen2_5_vl", [1]), ("qwen3_vl", [2])])
def test_prepare_calibrate_train_generate_on_m_rope_targets(tmp_path, prompts, family, candidates):
    """Qwen-VL end to end: regenerated data keeps `mm_token_type_ids` and the grids, calibration and
    training read the target's 3-D positions, and the trained drafter decodes losslessly. Qwen3-VL's
    entropy candidates start after its deepstack injections (one in the tiny model: layer 2 on)."""
    import torch

    from hf_dream.testing import build_tiny_target, make_tiny_inputs
    from hf_dream.training.data import load_from_disk

    data, spec = tmp_path / "data", f"tiny:{family}"
    assert main(["prepare-data", "--target", spec, "--prompts", str(prompts), "--output", str(data), "--max-new-tokens", "12"]) == 0
    row = load_from_disk(str(data / "dataset"))[0]
    assert len(row["mm_token_type_ids"]) == len(row["input_ids"]) and "image_grid_thw" in row
    assert main(["calibrate", "--target", spec, "--dataset", str(data), "--out", str(tmp_path / "cal")]) == 0
    report = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert report["candidate_layers"] == candidates and sum(report["counts"].values()) == report["response_tokens"] > 0
    run = tmp_path / "run"
    arguments = ["train", "--target", spec, "--dataset", str(data), "--output_dir", str(run), "--max_steps", "3"]
    arguments += ["--per_device_train_batch_size", "2", "--learning_rate", "0.001", "--use_cpu", "true", "--report_to", "none"]
    assert main(arguments + ["--save_strategy", "no", "--disable_tqdm", "true", "--eval_size", "2", "--acceptance_eval_samples", "1"]) == 0
    drafter = DreamDraftModel.from_pretrained(run / "drafter")
    assert drafter.config.mrope_section and drafter.config.entropy_candidate_layers == candidates
    target = build_tiny_target(family)
    inputs = make_tiny_inputs(target, seed=3, num_videos=1)
    greedy = dict(max_new_tokens=10, do_sample=False)
    assert torch.equal(target.generate(**inputs, assistant_model=drafter, **greedy), target.generate(**inputs, **greedy))
