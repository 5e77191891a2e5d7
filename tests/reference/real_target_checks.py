"""Checks shared by the tests of the real reference targets."""

from __future__ import annotations

import torch


def shape_and_color_answers_right(model, processor, prompt_for, count: int = 12) -> int:
    """How many of the first `count` easy-VQA test questions about a shape or colour `model` answers right (greedy)."""
    from PIL import Image

    from hf_dream.reference import build_prompt_inputs, easy_vqa

    examples, paths = easy_vqa.load_split("test")
    asked = [ex for ex in examples if ex.answer in easy_vqa.SHAPES + easy_vqa.COLORS][:count]
    right = 0
    for ex in asked:
        inputs = build_prompt_inputs(processor, Image.open(paths[ex.image_id]), prompt_for(ex.question))
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        right += easy_vqa.normalize_answer(answer) == ex.answer
    return right


def dream_equals_plain_on_a_description(model, processor, max_new_tokens: int = 24) -> bool:
    """Greedy generate() with a fresh DREAM drafter equals plain greedy generate() on one test image."""
    from PIL import Image

    import hf_dream
    from hf_dream.reference import build_prompt_inputs, easy_vqa

    _, paths = easy_vqa.load_split("test")
    inputs = build_prompt_inputs(processor, Image.open(paths[0]), "Describe the image.")
    plain = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    drafter = hf_dream.DreamDraftModel.from_target(model)
    dream = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, assistant_model=drafter)
    return torch.equal(plain, dream)
