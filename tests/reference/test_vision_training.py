"""The one vision-training loop (`hf_dream.reference.vision_training`), on tiny stand-ins of both reference targets."""

from __future__ import annotations

import dataclasses
import importlib.util
import re

import pytest
import test_gemma3_reference as gemma3_tests
import test_smolvlm_reference as smolvlm_tests
import torch
import torch.nn.functional as F

from hf_dream.reference import gemma3, smolvlm
from hf_dream.reference.instruction_data import example_plan
from hf_dream.reference.scenes import PLACES, scene_from_seed
from hf_dream.reference.vision_training import (
    GRID,
    PROBE_COLORS,
    PROBE_SHAPES,
    VisionTrainingArguments,
    VisionTrainingModel,
    VisionTrainingSet,
    collate,
    train_vision,
)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("easy_vqa") is None, reason="needs `pip install easy-vqa==1.0`")


def tiny_target(name: str):
    """(model, processor, recipe) of a tiny stand-in for reference target `name`, assembled like the real one."""
    if name == "smolvlm-ref":
        tokenizer = smolvlm_tests.tiny_tokenizer()
        processor = smolvlm.build_processor(tokenizer)
        model = smolvlm.assemble(smolvlm_tests.tiny_text_lm(len(tokenizer) - len(smolvlm.ADDED_TOKENS)), tokenizer)
        return model, processor, smolvlm.vision_recipe(model, processor)
    model, processor, _ = gemma3_tests.tiny.__wrapped__()
    return model, processor, gemma3.vision_recipe(model, processor)


def responses(num: int):
    return [dataclasses.replace(e, response="A red circle and a blue star.", response_tokens=9, finished=i % 2 == 0)
            for i, e in enumerate(example_plan(num))]


def args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, warmup_steps=1, save_steps=1,
                  logging_steps=1, disable_tqdm=True, vqa_fraction=0.25)
    values.update(overrides)
    return VisionTrainingArguments(**values)


@pytest.fixture(params=["smolvlm-ref", "gemma3-ref"])
def target(request):
    return (request.param, *tiny_target(request.param))


def test_mixture_has_exact_shares_right_answers_and_right_probe_labels(target, tmp_path):
    from hf_dream.reference.vision_training import CAPTION_PROMPTS

    name, model, processor, recipe = target
    dataset = VisionTrainingSet(recipe, responses(6), args(tmp_path, max_steps=10, per_device_train_batch_size=4,
                                                          vqa_fraction=0.25, caption_fraction=0.25))
    assert len(dataset) == 40 and dataset.counts() == {"response": 20, "easy-vqa": 10, "caption": 10}
    examples = [dataset.example(i) for i in range(len(dataset))]
    kinds = [slot.kind for slot in dataset.slots]
    responses_seen = [dataset.slots[i].index for i in range(len(dataset)) if kinds[i] == "response"]
    assert sorted(responses_seen[:6]) == list(range(6))  # each pass covers every response once
    for slot, example, kind in zip(dataset.slots, examples, kinds):
        if kind == "easy-vqa":  # the question's one-word answer
            question = dataset.questions[slot.index]
            answer = question.answer[:1].upper() + question.answer[1:]
            assert example.cells is None and example.response_ids == recipe.tokenize("", answer, True)[1] and " " not in answer
            continue
        scene = scene_from_seed(example.image[1])
        for obj in scene.objects:
            shape, color = example.cells[obj.cell[1] * GRID + obj.cell[0]]
            assert (PROBE_SHAPES[shape], PROBE_COLORS[color]) == (obj.shape, obj.color)
        assert sum(c != (-1, -1) for c in example.cells) == len(scene.objects)
        if kind == "caption":  # the answer is the scene's own description, asked for with a caption prompt
            assert example.response_ids == recipe.tokenize("", scene.description(), True)[1]
            assert scene.description() in processor.tokenizer.decode(example.response_ids)
            assert any(recipe.tokenize(p, None, True)[0] == example.prompt_ids for p in CAPTION_PROMPTS)
    caption_seeds = {e.image[1] for e, k in zip(examples, kinds) if k == "caption"}
    assert len(caption_seeds) == 10 and not caption_seeds & {e.image[1] for e, k in zip(examples, kinds) if k == "response"}
    batch = collate(recipe, [dataset[i] for i in range(4)])
    for row, example in enumerate(examples[:4]):
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert labelled == example.response_ids
    assert len(PLACES) == GRID * GRID


def test_mixture_shares_must_leave_room_for_responses(target, tmp_path):
    _, _, _, recipe = target
    with pytest.raises(ValueError, match="vqa_fraction"):
        VisionTrainingSet(recipe, responses(2), args(tmp_path, vqa_fraction=0.6, caption_fraction=0.5))


def test_responses_are_cut_to_max_response_tokens(target, tmp_path):
    _, _, _, recipe = target
    long = [dataclasses.replace(e, response="word " * 60, finished=False) for e in example_plan(2)]
    dataset = VisionTrainingSet(recipe, long, args(tmp_path, max_response_tokens=7, vqa_fraction=0.0, caption_fraction=0.0))
    assert len(dataset.responses) == 2 and all(len(e.response_ids) == 7 for e in dataset.responses)


def test_training_loss_is_the_models_own_loss(target, tmp_path):
    """Label-only logits in the training forward compute exactly the cross-entropy of the model's own forward."""
    name, model, processor, recipe = target
    dataset = VisionTrainingSet(recipe, responses(3), args(tmp_path, vqa_fraction=0.0, caption_fraction=0.0))
    batch = collate(recipe, [dataset[i] for i in range(3)])
    wrapper = VisionTrainingModel(model, recipe)
    wrapper.probe_weight = 0.0
    with torch.no_grad():
        wrapper(**batch)
        ours = wrapper.last_metrics["answer_loss"]
        extra = recipe.forward_inputs(batch["input_ids"], batch["pixel_values"])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits
        reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    assert ours == pytest.approx(reference.item(), rel=1e-4)


def test_train_moves_only_the_vision_part_checkpoints_small_and_resumes(target, tmp_path):
    name, model, processor, recipe = target
    connector = next(recipe.connector.parameters())
    before, text_before = connector.detach().clone(), next(recipe.text_model.parameters()).detach().clone()
    logs = []
    summary = train_vision(model, recipe, responses(6), args(tmp_path), log=logs.append)
    assert summary["steps"] == 2 and summary["final_answer_loss"] > 0 and len(summary["log_history"]) == 2
    assert not torch.equal(before, connector)
    text_after = next(recipe.text_model.parameters())
    assert torch.equal(text_before, text_after) and text_after.dtype == torch.float32  # frozen, and exact float32 again
    checkpoint = tmp_path / "run" / "checkpoint-2" / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as f:
        keys = list(f.keys())
    assert keys and not any("text_model" in k or "language_model" in k or "lm_head" in k for k in keys)
    summary = train_vision(model, recipe, responses(6), args(tmp_path, max_steps=3), log=logs.append)
    assert summary["steps"] == 3 and summary["resumed_from"].endswith("checkpoint-2")
    assert any("resuming" in line for line in logs)


def test_probe_only_scenes_are_fresh_training_scenes_and_reach_the_probe(target, tmp_path):
    from hf_dream.reference.scenes import TRAIN
    from hf_dream.reference.vision_training import VisionCollator

    name, model, processor, recipe = target
    dataset = VisionTrainingSet(recipe, responses(4), args(tmp_path, vqa_fraction=0.0, caption_fraction=0.0))
    collator = VisionCollator(recipe, probe_scenes_per_step=3)
    first, second = collator([dataset[0], dataset[1]]), collator([dataset[2], dataset[3]])
    assert first["probe_pixel_values"].shape[0] == 3 and first["probe_cells"].shape[0] == 2 + 3
    assert not torch.equal(first["probe_pixel_values"], second["probe_pixel_values"])  # new scenes every batch
    response_seeds = {e.image[1] for e in dataset.responses}
    assert TRAIN.seed(VisionCollator.PROBE_SEED_OFFSET) not in response_seeds
    wrapper = VisionTrainingModel(model, recipe)
    wrapper.probe_weight = 1.0
    with torch.no_grad():
        with_extra = wrapper(**first)["loss"]
        without = wrapper(**{k: v[:2] if k.startswith("probe_") and k != "probe_pixel_values" else v
                             for k, v in first.items() if k != "probe_pixel_values"})["loss"]
    assert with_extra != without


def test_transcript_layout_puts_every_object_slot_at_a_fixed_offset():
    from hf_dream.reference.transcripts import TranscriptLayout, count_phrase

    words = {}
    text_ids = lambda text: [words.setdefault(w, len(words)) for w in re.findall(r" ?[^ ,.:]+|[,.:]| ", text)]  # noqa: E731 - word-level
    layout = TranscriptLayout.for_tokenizer(text_ids, 64)
    assert layout.count_width == len(text_ids(count_phrase(2)))
    for seed in range(40):
        scene = scene_from_seed(seed)
        ids = layout.ids(text_ids, scene)
        assert len(ids) == 64
        for k, obj in enumerate(scene.objects):
            start = layout.count_width + k * layout.object_width
            piece = text_ids(f" a {obj.size} {obj.color} {obj.shape} {obj.place}")
            assert ids[start : start + len(piece)] == piece  # slot k holds object k, wherever the others end
    assert layout.slots == 4
    short = TranscriptLayout.for_tokenizer(text_ids, 20)  # a block too short for every slot: fewer slots, cut at its length
    assert short.slots == 1 and len(short.ids(text_ids, scene_from_seed(3))) == 20


def test_scene_object_map_marks_the_patches_each_object_covers():
    scene = next(s for s in map(scene_from_seed, range(100)) if len(s.objects) == 2 and all(o.size == "large" for o in s.objects))
    owner = torch.tensor(scene.object_map(16))
    for k, obj in enumerate(scene.objects):
        rows, cols = (owner == k + 1).nonzero(as_tuple=True)
        assert len(rows) >= 6  # a large object covers many patches
        cell_x, cell_y = obj.cell
        assert abs(cols.float().mean().item() / 16 * 3 - (cell_x + 0.5)) < 0.5  # ... around its own cell
        assert abs(rows.float().mean().item() / 16 * 3 - (cell_y + 0.5)) < 0.5
    assert (owner == 0).sum() > 100


def test_stage_one_trains_the_image_tokens_towards_the_transcript(target, tmp_path, monkeypatch):
    from hf_dream.reference import vision_training

    name, model, processor, recipe = target
    monkeypatch.setattr(vision_training, "TRANSCRIPT_EVAL_SEEDS", range(4))
    run = args(tmp_path, transcript_steps=3, transcript_batch_size=2, dataloader_num_workers=0)
    before = {k: v.clone() for k, v in recipe.vision.state_dict().items()}
    record = vision_training.train_transcript(model, recipe, run, log=lambda message: None)
    assert record["steps"] == 3 and 0.0 <= record["word_accuracy"] <= 1.0
    assert any(not torch.equal(before[k], v) for k, v in recipe.vision.state_dict().items())
    assert (tmp_path / "run" / "transcript" / "checkpoint-3").is_dir()
    again = vision_training.train_transcript(model, recipe, run, log=lambda message: None)  # complete: resumes, trains no more
    assert again["resumed_from"].endswith("checkpoint-3") and again["steps"] == 3



def test_stage_zero_trains_the_tower_on_object_shapes_and_hands_its_head_to_stage_one(target, tmp_path, monkeypatch):
    from hf_dream.reference import vision_training

    name, model, processor, recipe = target
    monkeypatch.setattr(vision_training, "TRANSCRIPT_EVAL_SEEDS", range(4))
    run = args(tmp_path, shape_steps=2, transcript_steps=2, transcript_batch_size=2, object_shape_weight=1.0, transcript_vision_lr_scale=0.1)
    connector = {k: v.clone() for k, v in recipe.connector.state_dict().items()}
    vision = {k: v.clone() for k, v in recipe.vision.state_dict().items()}
    record, shape_model = vision_training.train_shapes(recipe, run, log=lambda message: None)
    assert record["steps"] == 2 and 0.0 <= record["shape_accuracy"] <= 1.0
    assert any(not torch.equal(vision[k], v) for k, v in recipe.vision.state_dict().items())
    assert all(torch.equal(connector[k], v) for k, v in recipe.connector.state_dict().items())  # stage 0: the tower alone
    assert (tmp_path / "run" / "shapes" / "checkpoint-2").is_dir()
    head = shape_model.object_head.weight.detach().clone()
    stage_one = vision_training.train_transcript(model, recipe, run, log=lambda message: None, object_head=shape_model.object_head)
    assert 0.0 <= stage_one["shape_word_accuracy"] <= 1.0
    assert not torch.equal(head, shape_model.object_head.weight)  # stage 1 trains stage 0's head on (object_shape_weight)
    groups = vision_training._stage_arguments(run, "transcript", 2, run.transcript_learning_rate, run.transcript_vision_lr_scale)
    assert groups.learning_rate == pytest.approx(run.transcript_learning_rate * 0.1)
    assert groups.learning_rate * groups.connector_lr_scale == pytest.approx(run.transcript_learning_rate)


def test_object_shape_logits_pool_each_objects_own_patches():
    from hf_dream.reference.vision_training import object_shape_logits

    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 5.0], [9.0, 9.0]]])  # patches of object 0, 0, 1, background
    owner = torch.tensor([[0, 0, 1, 4]])  # 4 = background
    shapes = torch.tensor([[2, 7, -100, -100]])
    logits, targets = object_shape_logits(torch.nn.Identity(), hidden, owner, shapes)
    assert torch.equal(targets, torch.tensor([2, 7]))
    assert torch.allclose(logits, torch.tensor([[2.0, 0.0], [0.0, 5.0]]))


def test_initial_weights_may_be_a_vision_tower_alone_and_wrong_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    from hf_dream.reference import smolvlm
    from hf_dream.reference.vision_training import load_initial_weights

    model, processor, recipe = tiny_target("smolvlm-ref")
    tower = {"vlm.model.vision_model." + k: v + 1.0 for k, v in recipe.vision.state_dict().items()}
    save_file(tower, tmp_path / "tower.safetensors")
    connector = {k: v.clone() for k, v in recipe.connector.state_dict().items()}
    messages = []
    assert load_initial_weights(model, recipe, str(tmp_path / "tower.safetensors"), log=messages.append) == {}
    assert all(torch.equal(v, tower["vlm.model.vision_model." + k]) for k, v in recipe.vision.state_dict().items())
    assert all(torch.equal(connector[k], v) for k, v in recipe.connector.state_dict().items())
    assert "connector starts fresh" in messages[0]
    save_file({**tower, "vlm.model.text_model.norm.weight": torch.ones(2)}, tmp_path / "text.safetensors")
    with pytest.raises(ValueError, match="not this target's vision tower or connector"):
        load_initial_weights(model, recipe, str(tmp_path / "text.safetensors"))
    build_file = {k.removeprefix("vlm."): v - 1.0 for k, v in tower.items()}  # what `build --retrain --weights` writes
    save_file({**build_file, smolvlm.ADDED_EMBEDDINGS_KEY: torch.zeros(1, 2)}, tmp_path / "build.safetensors")
    load_initial_weights(model, recipe, str(tmp_path / "build.safetensors"))
    assert all(torch.equal(v, build_file["model.vision_model." + k]) for k, v in recipe.vision.state_dict().items())
    half = dict(list(tower.items())[1:])
    save_file(half, tmp_path / "half.safetensors")
    with pytest.raises(ValueError, match="lacks 1 of the vision tower"):
        load_initial_weights(model, recipe, str(tmp_path / "half.safetensors"))


def test_train_arg_sets_any_vision_training_field_by_its_type_and_names_a_typo():
    from hf_dream.reference.commands import _training_overrides

    assert _training_overrides(["transcript_vision_lr_scale=0.1", "shape_steps=300", "bf16=false"]) == {
        "transcript_vision_lr_scale": 0.1, "shape_steps": 300, "bf16": False}
    with pytest.raises(SystemExit, match="did you mean 'shape_steps'"):
        _training_overrides(["shape_step=3"])
    with pytest.raises(SystemExit, match="shape_steps needs a value of type int"):
        _training_overrides(["shape_steps=many"])


def test_committed_recipe_runs_stage_by_stage_and_a_rerun_skips_finished_stages(tmp_path, monkeypatch):
    from hf_dream.reference import vision_training
    from hf_dream.reference.common import RetrainStage

    monkeypatch.setattr(vision_training, "TRANSCRIPT_EVAL_SEEDS", range(4))
    model, processor, recipe = tiny_target("smolvlm-ref")
    small = dict(per_device_train_batch_size=2, transcript_batch_size=2, warmup_steps=1, save_steps=1, logging_steps=1, vqa_fraction=0.25)
    stages = (
        RetrainStage("shapes", {**small, "max_steps": 0, "shape_steps": 2}),
        RetrainStage("transcript", {**small, "max_steps": 0, "transcript_steps": 2, "object_shape_weight": 1.0}),
        RetrainStage("mixture", {**small, "max_steps": 2}),
    )
    saved = []

    def save(path):
        saved.append(path.parent.name)
        smolvlm.save_trained_weights(model, path, {"name": "smolvlm-ref", "build_version": "v2"})

    def run(vlm, vlm_recipe, log=lambda message: None):
        return vision_training.train_vision_stages(
            vlm, vlm_recipe, responses(6), stages, tmp_path / "stages", save, overrides={"disable_tqdm": True}, log=log)

    summary = run(model, recipe)
    assert [s["stage"] for s in summary["stages"]] == ["shapes", "transcript", "mixture"] and saved == ["0-shapes", "1-transcript", "2-mixture"]
    assert summary["stages"][0]["shape_stage"]["steps"] == 2 and summary["stages"][0]["steps"] == 0  # no mixture pass in stage 0
    assert summary["stages"][1]["transcript_stage"]["steps"] == 2 and summary["stages"][2]["steps"] == 2
    # killed before the last stage finished: the rerun skips stages 0-1, starts stage 2 from stage 1's weights
    import shutil

    shutil.rmtree(tmp_path / "stages" / "2-mixture")
    logs = []
    summary = run(model, recipe, logs.append)
    assert saved[-1] == "2-mixture" and len(saved) == 4
    assert sum("already finished" in line for line in logs) == 2
    assert any("starting from the vision tower and connector of" in line and "1-transcript" in line for line in logs)
    # every stage finished: a fresh model ends with the last stage's weights
    final = {k: v.clone() for k, v in recipe.connector.state_dict().items()}
    model2, _, fresh_recipe = tiny_target("smolvlm-ref")
    run(model2, fresh_recipe)
    assert all(torch.equal(final[k], v) for k, v in fresh_recipe.connector.state_dict().items())
    with pytest.raises(ValueError, match=r"does not have: \['max_stepz'\]"):
        vision_training.train_vision_stages(model, recipe, [], (RetrainStage("x", {"max_stepz": 1}),), tmp_path / "x", save)


def test_build_cli_runs_the_committed_recipe_unless_a_training_option_is_given(monkeypatch):
    from hf_dream.cli import build_parser
    from hf_dream.reference import commands

    calls = []
    monkeypatch.setattr(smolvlm, "build", lambda **kwargs: calls.append(kwargs) or {k: 0 for k in ("cache_dir", "training_seconds", "build_seconds")})
    parse = lambda *extra: build_parser().parse_args(["reference", "build", "smolvlm-ref", *extra])  # noqa: E731
    commands._build(parse("--retrain", "--init-weights", "w.safetensors"))
    assert calls[-1]["training_args"] is None and calls[-1]["init_weights"] == "w.safetensors"
    commands._build(parse("--retrain", "--steps", "7", "--train-arg", "vqa_fraction=0.5"))
    one_run = calls[-1]["training_args"]
    assert isinstance(one_run, VisionTrainingArguments) and one_run.max_steps == 7 and one_run.vqa_fraction == 0.5
    assert one_run.learning_rate == VisionTrainingArguments(output_dir=None).learning_rate  # the rest: the defaults
    with pytest.raises(SystemExit, match=r"training options \(max_steps\) need --retrain"):
        commands._build(parse("--steps", "7"))
    assert len(smolvlm.RETRAIN_STAGES) >= 3 and smolvlm.RETRAIN_STAGES[0].arguments["shape_steps"] > 0
