"""`prepare_dataset` never mixes two runs in one folder: another target, edited prompts or other settings are
refused before any generation, naming the difference (B7); a prepared dataset is refused for another target."""

from __future__ import annotations

import pytest
from conftest import cached_target

from hf_dream.testing import make_tiny_inputs
from hf_dream.training import prepare_dataset
from hf_dream.training.data import recorded_settings
from hf_dream.training.script import check_prepared_for


def run(target, folder, examples, calls=None, **kwargs):
    def encode(example):
        if calls is not None:
            calls.append(example["seed"])
        return make_tiny_inputs(target, seed=example["seed"])

    options = dict(max_new_tokens=6, batch_size=2, shard_size=2, show_progress=False)
    return prepare_dataset(target, examples, encode, folder, **{**options, **kwargs})


def killed_after_first_shard(folder):
    import shutil

    for shard in sorted((folder / "shards").iterdir())[1:]:
        shutil.rmtree(shard)
    shutil.rmtree(folder / "dataset")


EXAMPLES = [{"seed": i, "prompt": f"prompt {i}"} for i in range(4)]


@pytest.mark.parametrize(
    "other, message",
    [
        (("llava", 7), r"another target: the folder was made with tiny:llava, now tiny:llava:7 \(weights_fingerprint"),
        (("idefics3", 0), r"another target: .*model_type 'llava' -> 'idefics3'"),
    ],
)
def test_resuming_with_another_target_is_refused_before_any_generation(tmp_path, other, message):
    run(cached_target("llava"), tmp_path, EXAMPLES, target_spec="tiny:llava")
    killed_after_first_shard(tmp_path)
    calls = []
    family, seed = other
    with pytest.raises(ValueError, match=message):
        run(cached_target(family, seed=seed), tmp_path, EXAMPLES, calls, target_spec=f"tiny:{family}:{seed}" if seed else f"tiny:{family}")
    assert calls == []  # nothing was encoded or generated
    assert recorded_settings(tmp_path)["target_spec"] == "tiny:llava"


def test_resuming_with_edited_prompts_or_other_settings_names_the_difference(tmp_path):
    target = cached_target("llava")
    run(target, tmp_path, EXAMPLES)
    killed_after_first_shard(tmp_path)
    edited = [dict(example, prompt=example["prompt"] + "!") if example["seed"] == 3 else example for example in EXAMPLES]
    with pytest.raises(ValueError, match="the source examples differ"):
        run(target, tmp_path, edited)
    with pytest.raises(ValueError, match="batch_size: 2 before, 1 now"):
        run(target, tmp_path, EXAMPLES, batch_size=1)
    with pytest.raises(ValueError, match="generate_kwargs"):
        run(target, tmp_path, EXAMPLES, repetition_penalty=1.3)
    resumed = run(target, tmp_path, EXAMPLES)  # the same run resumes
    assert resumed["source_index"] == [0, 1, 2, 3]


def test_a_folder_from_an_older_hf_dream_is_not_resumed_blindly(tmp_path):
    import json

    (tmp_path / "shards").mkdir()
    (tmp_path / "settings.json").write_text(json.dumps({"max_new_tokens": 6, "do_sample": False, "num_examples": 4, "shard_size": 2}))
    with pytest.raises(ValueError, match="target: not recorded by the earlier run"):
        run(cached_target("llava"), tmp_path, EXAMPLES)


def test_a_dataset_prepared_for_another_target_is_refused_for_training(tmp_path):
    run(cached_target("llava"), tmp_path, EXAMPLES, target_spec="tiny:llava")
    check_prepared_for(tmp_path / "dataset", cached_target("llava"), "tiny:llava")  # the same target: fine
    with pytest.raises(ValueError, match=r"--dataset .* was prepared with tiny:llava, not with --target tiny:idefics3 \(model_type"):
        check_prepared_for(tmp_path / "dataset", cached_target("idefics3"), "tiny:idefics3")


def test_an_image_edited_in_place_is_named_before_any_generation(tmp_path, monkeypatch):
    """The source hash covers what the image files hold, not only their paths: an image rewritten under the
    same name is refused on resume, naming the image files; every file is read once however many examples name it."""
    from hf_dream.training import data

    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        (images / name).write_bytes(name.encode() * 100)
    examples = [dict(example, image=["a.png", "b.png"][example["seed"] % 2]) for example in EXAMPLES]
    reads = []
    file_sha256 = data._file_sha256
    monkeypatch.setattr(data, "_file_sha256", lambda path: reads.append(path.name) or file_sha256(path))
    target, output = cached_target("llava"), tmp_path / "out"
    run(target, output, examples, image_dir=images)
    assert sorted(reads) == ["a.png", "b.png"]
    killed_after_first_shard(output)
    (images / "b.png").write_bytes(b"edited" * 100)  # same path, other pixels
    calls = []
    with pytest.raises(ValueError, match=r"the image files differ \(an image the prompts name was edited") as refused:
        run(target, output, examples, calls, image_dir=images)
    assert "source examples differ" not in str(refused.value) and calls == []
    (images / "b.png").write_bytes(b"b.png" * 100)
    assert run(target, output, examples, image_dir=images)["source_index"] == [0, 1, 2, 3]  # the same files resume


def test_token_type_inputs_come_from_the_target_adapters(monkeypatch):
    """Which inputs are per-token kind marks is each family adapter's knowledge: a newly registered family's
    key is padded along the sequence, sliced with the prompt and extended over the response like Gemma3's."""
    import torch

    from hf_dream.targets import TARGET_ADAPTERS, Gemma3Adapter, Qwen2_5_VLAdapter, TargetAdapter, token_type_keys
    from hf_dream.training.data import DreamDataCollator, response_row
    from hf_dream.training.trainer import prompt_inputs

    assert Gemma3Adapter.token_type_keys == ("token_type_ids",)
    assert Qwen2_5_VLAdapter.token_type_keys == ("mm_token_type_ids",)
    assert TargetAdapter.token_type_keys == ()
    assert "kind_marks" not in token_type_keys()

    class MarkedAdapter(TargetAdapter):
        family, model_types, token_type_keys = "marked", ("marked-vlm",), ("kind_marks",)

    monkeypatch.setitem(TARGET_ADAPTERS, "marked-vlm", [MarkedAdapter])
    assert "kind_marks" in token_type_keys()
    sample = {"input_ids": torch.tensor([[5, 6, 7]]), "kind_marks": torch.tensor([[0, 1, 1]]), "pixel_values": torch.ones(1, 2)}
    row = response_row(sample, [8, 9])
    assert row["kind_marks"] == [0, 1, 1, 0, 0]  # response tokens are text
    short = response_row({**sample, "input_ids": torch.tensor([[5]]), "kind_marks": torch.tensor([[1]])}, [8])
    batch = DreamDataCollator(pad_token_id=3)([row, short])
    assert batch["kind_marks"].tolist() == [[0, 1, 1, 0, 0], [1, 0, 0, 0, 0]]  # padded along the sequence with 0
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 8, 3, 3, 3]]
    assert batch["pixel_values"].shape == (2, 2)  # image tensors still concatenate per image
    assert prompt_inputs(row, "cpu")["kind_marks"].tolist() == [[0, 1, 1]]
