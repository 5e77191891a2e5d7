"""easy-VQA (the `easy-vqa==1.0` package): 64x64 images of one coloured shape, questions with 13 answers.

Used to give the reference VLM's vision tower real visual dependence, and to measure it. The
package ships 4,000 train / 1,000 test images and 38,575 / 9,673 questions; answers are one of
`yes no circle rectangle triangle` and 8 colours. The data is read straight from the package's
files (its own helpers only return paths).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

from .common import MissingReferenceAsset, package_file

EASY_VQA_PIP = "pip install easy-vqa==1.0"
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
ANSWERS = ("yes", "no", *SHAPES, *COLORS)

# Extra phrasings mixed into training (a user asks "What shape is in the image?", not only
# easy-VQA's lowercase templates). `{}` is filled with nothing: the answer is the image's shape/colour.
SHAPE_PARAPHRASES = (
    "What shape is this?",
    "Which shape do you see?",
    "What kind of shape is shown in the picture?",
    "Name the shape in the image.",
    "What geometric shape is drawn here?",
)
COLOR_PARAPHRASES = (
    "What colour is the shape?",
    "Which color is the object in the image?",
    "What color do you see?",
    "Name the color of the shape.",
    "What is the colour of the object in this picture?",
)


_WORD = re.compile(r"[a-z]+")


@dataclasses.dataclass(frozen=True)
class VQAExample:
    """One easy-VQA question with its one-word answer and the id of its image."""

    question: str
    answer: str
    image_id: int


def data_dir() -> Path:
    """The `data/` folder inside the installed `easy_vqa` package (clear error with the pip command if missing)."""
    return package_file("easy_vqa", "data/answers.txt", EASY_VQA_PIP).parent


def load_split(split: str) -> tuple[list[VQAExample], dict[int, Path]]:
    """(questions, image paths by id) of `split` ("train" or "test")."""
    if split not in ("train", "test"):
        raise ValueError(f"easy-VQA has splits 'train' and 'test', not {split!r}")
    root = data_dir() / split
    questions_file = root / "questions.json"
    if not questions_file.is_file():
        raise MissingReferenceAsset(f"{questions_file} is missing. Reinstall with:\n    {EASY_VQA_PIP} --force-reinstall")
    examples = [VQAExample(q, a, int(i)) for q, a, i in json.loads(questions_file.read_text())]
    images = {int(p.stem): p for p in (root / "images").glob("*.png")}
    return examples, images


def image_attributes(examples: list[VQAExample]) -> dict[int, dict[str, str]]:
    """Each image's shape and colour, read off the answers to its questions.

    Every easy-VQA image holds exactly one shape of one colour. "What shape/colour" answers name
    them; a yes/no question names one when it is answered affirmatively ("is there a red
    shape?" -> yes, "is there not a circle?" -> no). Images whose questions never tell are
    absent from the corresponding key.
    """
    attributes: dict[int, dict[str, str]] = {}
    for ex in examples:
        if ex.answer in SHAPES:
            attributes.setdefault(ex.image_id, {})["shape"] = ex.answer
        elif ex.answer in COLORS:
            attributes.setdefault(ex.image_id, {})["color"] = ex.answer
        else:
            words = _WORD.findall(ex.question.lower())
            negated = "not" in words or words[:2] == ["is", "no"]
            if (ex.answer == "yes") == negated:
                continue  # the named attribute is absent: says nothing about what is there
            for word in words:
                if word in SHAPES:
                    attributes.setdefault(ex.image_id, {})["shape"] = word
                elif word in COLORS:
                    attributes.setdefault(ex.image_id, {})["color"] = word
    return attributes


def paraphrased_examples(examples: list[VQAExample], seed: int = 0) -> list[VQAExample]:
    """One extra SmolVLM-style question per known image attribute ("What shape is this?" -> circle)."""
    rng = random.Random(seed)
    extra = []
    for image_id, attrs in sorted(image_attributes(examples).items()):
        if "shape" in attrs:
            extra.append(VQAExample(rng.choice(SHAPE_PARAPHRASES), attrs["shape"], image_id))
        if "color" in attrs:
            extra.append(VQAExample(rng.choice(COLOR_PARAPHRASES), attrs["color"], image_id))
    return extra


def question_kind(example: VQAExample) -> str:
    """"yes/no", "shape" or "color": the kind of answer the question asks for."""
    if example.answer in ("yes", "no"):
        return "yes/no"
    return "shape" if example.answer in SHAPES else "color"


def normalize_answer(text: str) -> str:
    """Lower-case, keep letters only, and map the spelling "grey" to easy-VQA's "gray".

    The normalised exact match takes the first word of the generation: the target is trained to
    answer with one word ("Yes", "Circle."), so punctuation and case must not count.
    """
    words = _WORD.findall(text.lower())
    if not words:
        return ""
    word = words[0]
    return {"grey": "gray"}.get(word, word)


# --- evaluation ------------------------------------------------------------------------------
IMAGE_MODES = ("real", "blank", "shuffled")


def derangement(ids: list[int], seed: int = 0) -> dict[int, int]:
    """A seeded map from each image id to a *different* image id (for the wrong-image baseline)."""
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    return {a: b for a, b in zip(order, order[1:] + order[:1])}


def blank_image(size: int = 64):
    """A plain white image. Not black: after SigLIP normalisation black is all zeros, and Idefics3
    drops all-zero images as padding (the image-token count would then not match)."""
    from PIL import Image

    return Image.new("RGB", (size, size), (255, 255, 255))


def evaluate(
    model,
    processor,
    prompt_for: Callable[[str], str],
    split: str = "test",
    image_mode: str = "real",
    limit: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 5,
    seed: int = 0,
    progress: bool = True,
    keep_examples: int = 12,
) -> dict:
    """Greedy easy-VQA accuracy of an image-text-to-text `model` with a chat-templated `processor`.

    Each question is asked as one user turn (image, then `prompt_for(question)`); the answer is
    right when `normalize_answer` of the generation equals the label. `image_mode` picks the image
    shown: the question's own ("real"), a white image ("blank"), or another test image
    ("shuffled", a seeded derangement): the last two measure how much the answers rely on the
    image. `limit` takes a seeded random subset of the questions.
    """
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    if image_mode not in IMAGE_MODES:
        raise ValueError(f"image_mode must be one of {IMAGE_MODES}, not {image_mode!r}")
    examples, paths = load_split(split)
    if limit is not None and limit < len(examples):
        examples = random.Random(seed).sample(examples, limit)
    wrong = derangement(list(paths), seed) if image_mode == "shuffled" else {}
    blank = blank_image()
    image_cache: dict[int, Image.Image] = {}

    def image_for(ex: VQAExample):
        if image_mode == "blank":
            return blank
        image_id = wrong.get(ex.image_id, ex.image_id)
        if image_id not in image_cache:
            image_cache[image_id] = Image.open(paths[image_id]).convert("RGB")
        return image_cache[image_id]

    tokenizer = processor.tokenizer
    if tokenizer.padding_side != "left":
        raise ValueError("batched generation needs a left-padding tokenizer (processor.tokenizer.padding_side = 'left')")
    correct = 0
    by_kind: dict[str, list[int]] = {}
    confusion: dict[str, dict[str, int]] = {}
    samples = []
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(examples), batch_size), desc=f"easy-VQA {split} ({image_mode} image)", disable=not progress):
        batch = examples[start : start + batch_size]
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt_for(ex.question)}]}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for ex in batch
        ]
        inputs = processor(text=texts, images=[[image_for(ex)] for ex in batch], padding=True, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        texts_out = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for ex, text in zip(batch, texts_out):
            prediction = normalize_answer(text)
            ok = prediction == ex.answer
            correct += ok
            by_kind.setdefault(question_kind(ex), []).append(ok)
            row = confusion.setdefault(ex.answer, {})
            row[prediction if prediction in ANSWERS else "<other>"] = row.get(prediction if prediction in ANSWERS else "<other>", 0) + 1
            if len(samples) < keep_examples:
                samples.append({"question": ex.question, "answer": ex.answer, "generated": text, "correct": bool(ok)})
    n = len(examples)
    return {
        "image_mode": image_mode,
        "questions": n,
        "accuracy": round(correct / n, 4),
        "by_question_kind": {k: {"questions": len(v), "accuracy": round(sum(v) / len(v), 4)} for k, v in sorted(by_kind.items())},
        "confusion": confusion,
        "samples": samples,
    }


def majority_baselines(split: str = "test") -> dict:
    """Accuracy of always giving the most frequent answer of each question kind (a blind guesser's ceiling)."""
    examples, _ = load_split(split)
    by_kind: dict[str, dict[str, int]] = {}
    for ex in examples:
        counts = by_kind.setdefault(question_kind(ex), {})
        counts[ex.answer] = counts.get(ex.answer, 0) + 1
    total = sum(max(c.values()) for c in by_kind.values())
    return {
        "accuracy": round(total / len(examples), 4),
        "by_question_kind": {
            kind: {"answer": max(c, key=c.get), "accuracy": round(max(c.values()) / sum(c.values()), 4)}
            for kind, c in sorted(by_kind.items())
        },
    }
