"""Drafter data: the prompt plan is prefix-stable and held out from evaluation; the committed file is rewritten after
every shard, rebuilds the dataset on a fresh machine without generating, and is refused for another build."""

from __future__ import annotations

import gzip
import importlib.util
import json

import pytest
import torch
from conftest import cached_target

from hf_dream.reference import drafter_data
from hf_dream.reference.instructions import all_wordings
from hf_dream.reference.scenes import EVAL, TRAIN

pytestmark = pytest.mark.skipif(importlib.util.find_spec("easy_vqa") is None, reason="needs easy-vqa (the [reference] extra)")


def vqa_prompt(question: str) -> str:
    return question + " Answer with one word."


def make(target, tmp_path, num=6, folder="run", data_file="data.jsonl.gz", **kwargs):
    options = dict(batch_size=2, max_new_tokens=5, shard_size=2, progress=False, log=lambda message: None)
    return drafter_data.make_drafter_data(
        "smolvlm-ref", target, None, num, tmp_path / folder, vqa_prompt, data_file=tmp_path / data_file, **{**options, **kwargs}
    )


def test_plan_is_prefix_stable_mixes_scenes_and_easy_vqa_and_never_uses_evaluation_material():
    short, long = drafter_data.prompt_plan(40, vqa_prompt), drafter_data.prompt_plan(400, vqa_prompt)
    assert long[:40] == short
    scenes = [p for p in long if p.source == "scene"]
    questions = [p for p in long if p.source == "easy-vqa"]
    assert 0.08 < len(questions) / len(long) < 0.25
    assert all(p.image_id in TRAIN and p.image_id not in EVAL for p in scenes)
    # none of the vision training's scenes: its responses (seeds 0..), probe (5,000,000..) and later kinds
    from hf_dream.reference.vision_training import CAPTION_SEED_OFFSET, TRANSCRIPT_SEED_OFFSET, VisionCollator

    first_vision_seed = min(VisionCollator.PROBE_SEED_OFFSET, CAPTION_SEED_OFFSET, TRANSCRIPT_SEED_OFFSET)
    assert (
        100_000
        < drafter_data.SCENE_SEED_OFFSET
        <= min(p.image_id for p in scenes)
        < max(p.image_id for p in scenes)
        < first_vision_seed
    )
    assert len({p.kind for p in scenes}) >= 8  # the instruction mix, not one request
    heldout = all_wordings("heldout")
    assert not any(p.prompt in heldout for p in scenes)
    assert all(p.prompt.endswith("Answer with one word.") for p in questions)
    assert long[0].image().size == (drafter_data.IMAGE_SIZE, drafter_data.IMAGE_SIZE)
    assert next(p for p in long if p.source == "easy-vqa").image().mode == "RGB"


def test_committed_file_rebuilds_the_dataset_without_generation(tmp_path, monkeypatch):
    target = cached_target("idefics3")
    dataset = make(target, tmp_path)
    examples, record = drafter_data.read_responses(tmp_path / "data.jsonl.gz")
    assert [e["index"] for e in examples] == list(range(6))
    assert record["examples"] == 6 and record["target_build"] == record["target_identity"]["build"]
    assert record["response_tokens"] == sum(len(e["response_ids"]) for e in examples) > 0
    # a fresh machine: a new output folder, only the committed file; generating anything would fail
    monkeypatch.setattr(type(target), "generate", lambda *args, **kwargs: pytest.fail("regenerated a committed example"))
    rebuilt = make(target, tmp_path, folder="fresh")
    assert rebuilt["input_ids"] == dataset["input_ids"] and rebuilt["prompt_length"] == dataset["prompt_length"]
    assert torch.equal(torch.as_tensor(rebuilt["pixel_values"]), torch.as_tensor(dataset["pixel_values"]))


def test_a_longer_plan_regenerates_only_the_new_shards_and_the_file_grows_after_every_shard(tmp_path, monkeypatch):
    target = cached_target("idefics3")
    make(target, tmp_path, num=4)
    generate, calls, sizes = type(target).generate, [], []

    def counting(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        sizes.append(len(drafter_data.read_responses(tmp_path / "data.jsonl.gz")[0]))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(type(target), "generate", counting)
    make(target, tmp_path, num=8, folder="longer")
    assert calls == [2, 2]  # examples 4..7 only: 0..3 came from the file
    assert sizes == [4, 6]  # the file was rewritten after shard 2, before shard 3 was generated
    assert len(drafter_data.read_responses(tmp_path / "data.jsonl.gz")[0]) == 8
    # a shorter plan uses the file's first examples and leaves the file whole
    assert len(make(target, tmp_path, num=4, folder="shorter")) == 4
    assert len(drafter_data.read_responses(tmp_path / "data.jsonl.gz")[0]) == 8


def test_ranks_import_disjoint_committed_shards_whose_union_is_the_single_process_import(tmp_path):
    # under torchrun every rank imports the committed file: each must write its own shards (two writing one shard race)
    from hf_dream.training.data import DataRanks

    make(cached_target("idefics3"), tmp_path, num=6)
    examples, _ = drafter_data.read_responses(tmp_path / "data.jsonl.gz")
    plan = drafter_data.prompt_plan(6, vqa_prompt)

    def encode(example):
        return {"input_ids": torch.tensor([[7, example["index"]]])}

    def shards(folder):
        return sorted(path.name for path in folder.iterdir() if not path.name.startswith("."))

    for rank in (0, 1):
        (tmp_path / f"rank{rank}").mkdir()
        drafter_data.import_committed(examples, plan, encode, tmp_path / f"rank{rank}", 2, DataRanks(rank, 2))
    (tmp_path / "single").mkdir()
    assert drafter_data.import_committed(examples, plan, encode, tmp_path / "single", 2) == 3
    assert shards(tmp_path / "rank0") == ["00000", "00002"] and shards(tmp_path / "rank1") == ["00001"]
    assert sorted(shards(tmp_path / "rank0") + shards(tmp_path / "rank1")) == shards(tmp_path / "single")


def test_another_build_or_other_settings_cannot_seed_a_run(tmp_path):
    make(cached_target("idefics3"), tmp_path, num=2)
    with pytest.raises(ValueError, match=r"another target build or with other settings.*target_identity"):
        make(cached_target("idefics3", seed=1), tmp_path, num=2, folder="other")
    with pytest.raises(ValueError, match=r"generation.*'max_new_tokens': 5.*'max_new_tokens': 7"):
        make(cached_target("idefics3"), tmp_path, num=2, folder="other", max_new_tokens=7)


def test_a_file_of_another_plan_is_refused(tmp_path):
    make(cached_target("idefics3"), tmp_path, num=2)
    path = tmp_path / "data.jsonl.gz"
    examples = [json.loads(line) for line in gzip.open(path, "rt")]
    examples[1]["prompt"] = "edited"
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(e) + "\n" for e in examples))
    with pytest.raises(ValueError, match="example 1 of another prompt plan"):
        make(cached_target("idefics3"), tmp_path, num=2, folder="other")


def test_cli_needs_an_output_folder_before_loading_the_target(monkeypatch, capsys):
    from hf_dream.cli import main

    monkeypatch.setattr("hf_dream.reference.load_reference_target", lambda *a, **k: pytest.fail("loaded the target"))
    with pytest.raises(SystemExit, match="drafter-data needs --output DIR"):
        main(["reference", "drafter-data", "smolvlm-ref"])
    with pytest.raises(SystemExit, match="--num must be at least 1, not 0"):
        main(["reference", "drafter-data", "smolvlm-ref", "--num", "0", "--output", "x"])
