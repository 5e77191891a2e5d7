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


@dataclasses.dataclass(frozen=True)
class VQAExample:
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
    """Each image's shape and colour, read off the answers to its "what shape/colour" questions.

    Every easy-VQA image holds exactly one shape of one colour; images whose questions never ask
    for them are simply absent from the corresponding key.
    """
    attributes: dict[int, dict[str, str]] = {}
    for ex in examples:
        if ex.answer in SHAPES:
            attributes.setdefault(ex.image_id, {})["shape"] = ex.answer
        elif ex.answer in COLORS:
            attributes.setdefault(ex.image_id, {})["color"] = ex.answer
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


_WORD = re.compile(r"[a-z]+")


def normalize_answer(text: str) -> str:
    """Lower-case, keep letters only, and map spelling variants ("grey", "colour" words) to easy-VQA's answers.

    The normalised exact match takes the first word of the generation: the target is trained to
    answer with one word ("Yes", "Circle."), so punctuation and case must not count.
    """
    words = _WORD.findall(text.lower())
    if not words:
        return ""
    word = words[0]
    return {"grey": "gray", "square": "rectangle"}.get(word, word)
