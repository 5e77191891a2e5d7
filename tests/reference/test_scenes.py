"""Procedural scenes and the instruction mix: deterministic, disjoint splits, descriptions that match the pictures."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest

from hf_dream.reference import instructions, scenes
from hf_dream.reference.quality import has_loop, main_object, names_object


def pixels_hash(image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def test_same_seed_same_scene_and_picture():
    a, b = scenes.scene_from_seed(123), scenes.scene_from_seed(123)
    assert a == b and a.description() == b.description()
    assert pixels_hash(a.draw()) == pixels_hash(b.draw())
    assert a.draw().size == (128, 128)
    assert scenes.scene_from_seed(124) != a


def test_splits_are_disjoint_and_bounded():
    assert scenes.TRAIN.start + scenes.TRAIN.size <= scenes.EVAL.start
    assert scenes.TRAIN.seed(5) in scenes.TRAIN and scenes.TRAIN.seed(5) not in scenes.EVAL
    with pytest.raises(IndexError, match="train split"):
        scenes.TRAIN.seed(scenes.TRAIN.size)


@pytest.mark.parametrize("seed", range(40))
def test_description_names_every_object_and_objects_are_distinct(seed):
    scene = scenes.scene_from_seed(scenes.EVAL.seed(seed))
    text = scene.description()
    assert 1 <= len(scene.objects) <= 4
    assert len({o.cell for o in scene.objects}) == len(scene.objects)  # one object per grid cell
    assert len({o.name for o in scene.objects}) == len(scene.objects)  # "the red circle" is unambiguous
    for obj in scene.objects:
        assert f"{obj.size} {obj.color} {obj.shape} {obj.place}" in text
    assert scene.background in text


@pytest.mark.parametrize("seed", range(12))
def test_each_object_is_drawn_in_its_colour_at_its_place(seed):
    scene = scenes.scene_from_seed(seed)
    image = np.asarray(scene.draw()).astype(int)
    for obj in scene.objects:
        cx = int((obj.cell[0] + 0.5) * 128 / 3 + obj.offset[0])
        cy = int((obj.cell[1] + 0.5) * 128 / 3 + obj.offset[1])
        patch = image[cy - 2 : cy + 3, cx - 2 : cx + 3].reshape(-1, 3)
        distance = np.abs(patch - np.array(scenes.COLORS[obj.color])).sum(1).min()
        assert distance < 60, (obj, distance)


def test_instruction_wordings_never_cross_splits():
    train, heldout = instructions.all_wordings("train"), instructions.all_wordings("heldout")
    assert train and heldout and not train & heldout
    assert all(k.train and k.heldout for k in instructions.KINDS)


def test_instructions_name_objects_of_the_scene_and_respect_object_counts():
    rng = random.Random(0)
    one = next(s for s in map(scenes.scene_from_seed, range(100)) if len(s.objects) == 1)
    kinds = {instructions.instruction_for(one, rng)[0] for _ in range(200)}
    assert "compare" not in kinds and "describe" in kinds
    two = next(s for s in map(scenes.scene_from_seed, range(100)) if len(s.objects) >= 2)
    kind, text = instructions.instruction_for(two, rng, kind="compare")
    assert kind == "compare" and sum(o.name in text for o in two.objects) == 2
    with pytest.raises(ValueError, match="does not apply"):
        instructions.instruction_for(one, rng, kind="compare")
    with pytest.raises(ValueError, match="split"):
        instructions.instruction_for(one, rng, split="test")


def test_quality_helpers():
    assert has_loop([1, 2, 3, 4] * 4) and not has_loop([1, 2, 3, 4] * 3) and not has_loop(list(range(50)))
    assert names_object("A big grey oval sits on top.", "gray", "ellipse")
    assert not names_object("A big grey shape.", "gray", "ellipse")
    scene = next(s for s in map(scenes.scene_from_seed, range(100)) if {o.size for o in s.objects} >= {"large", "small"})
    assert main_object(scene).size == "large"


def test_quality_report_runs_end_to_end_on_a_tiny_target():
    """Every measurement of `hf-dream reference quality` runs and lands in the report and its Markdown page."""
    import importlib.util

    if importlib.util.find_spec("easy_vqa") is None or importlib.util.find_spec("skimage") is None:
        pytest.skip("needs easy-vqa and scikit-image")
    import test_smolvlm_reference as smolvlm_tests

    from hf_dream.reference import smolvlm
    from hf_dream.reference.quality import evaluate_quality, render_markdown

    tokenizer = smolvlm_tests.tiny_tokenizer()
    processor = smolvlm.build_processor(tokenizer)
    model = smolvlm.assemble(smolvlm_tests.tiny_text_lm(len(tokenizer) - len(smolvlm.ADDED_TOKENS)), tokenizer)
    report = evaluate_quality("smolvlm-ref", model, processor, num_open=2, num_grounding=2, num_agreement=2, vqa_limit=4,
                              batch_size=4, progress=False, log=lambda _: None)
    report.update(target="smolvlm-ref", build_id="tiny", command="test", date="now")
    shipped = report["open_ended"]["shipped_config"]
    photos = sum(a["source"] != "scene" for a in shipped["answers"])
    assert photos >= 8 and shipped["length"]["n"] == len(shipped["answers"]) == 2 + photos  # 2 scenes + the bundled photos
    assert 0 <= shipped["loop_share"] <= 1 and report["open_ended"]["no_repetition_penalty"]["length"]["n"] == 2 + photos
    assert set(report["grounding"]) == {"real_image", "other_scene_image"}
    assert 0 <= report["text_model_agreement"]["position_match_rate_first_32"] <= 1
    assert set(report["easy_vqa"]) == {"real", "blank", "shuffled"}
    page = render_markdown(report)
    assert "degenerate loops" in page and "easy-VQA" in page
