"""The instruction mix of the reference targets' image-grounded data: kinds of request, each with wordings.

Every kind has *training* wordings and separate *held-out* wordings (never used to make training
data), so a benchmark can ask in words the model and its drafter never saw. Some wordings name an
object of the scene (`{object}`, `{other}`: "the red circle"); `instruction_for` fills them in.

```python
from hf_dream.reference.instructions import instruction_for
kind, text = instruction_for(scene, rng, split="train")
```
"""

from __future__ import annotations

import dataclasses
import random

from .scenes import Scene


@dataclasses.dataclass(frozen=True)
class InstructionKind:
    """A kind of request: its name, training and held-out wordings, how often it is drawn, how many objects it needs."""

    name: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]
    weight: float = 1.0
    min_objects: int = 1
    open_ended: bool = True  # a paragraph is expected (counting and "where is" are short)


KINDS: tuple[InstructionKind, ...] = (
    InstructionKind(
        "describe",
        ("Describe this image in detail.", "Describe the picture.", "What do you see in this image? Describe it.",
         "Give a detailed description of this picture."),
        ("Describe everything you can see in this picture.", "Tell me, in detail, what this picture shows.",
         "Describe this image to someone who cannot see it."),
        weight=2.5,
    ),
    InstructionKind(
        "child",
        ("Explain this picture to a seven-year-old.", "Explain to a child what is shown in this image."),
        ("How would you describe this picture to a little kid?",),
    ),
    InstructionKind(
        "story",
        ("Write a short story about this picture.", "Tell a story inspired by this image."),
        ("Tell me a story that starts with this image.", "Make up a bedtime story about what is in this picture."),
    ),
    InstructionKind(
        "poem",
        ("Write a poem about this image.", "Compose a short poem inspired by this picture."),
        ("Write a few lines of verse about this picture.",),
    ),
    InstructionKind(
        "title",
        ("Suggest a title for this picture and explain why it fits.", "Give this image a title and justify it."),
        ("What would you call this picture if it hung in a gallery? Explain your choice.",),
    ),
    InstructionKind(
        "list",
        ("List the objects in this image.", "Make a list of everything in the picture."),
        ("Name each thing you can see in this picture, one by one.",),
        weight=0.8,
    ),
    InstructionKind(
        "count",
        ("How many objects are in this image?", "Count the shapes in the picture."),
        ("How many things can you see in this picture?",),
        weight=0.6,
        open_ended=False,
    ),
    InstructionKind(
        "where",
        ("Where is the {object} in the image?", "Where is the {object} located in this picture?"),
        ("In which part of the picture do you find the {object}?",),
        weight=0.7,
        open_ended=False,
    ),
    InstructionKind(
        "compare",
        ("Compare the {object} and the {other} in this image.", "How are the {object} and the {other} different?"),
        ("What do the {object} and the {other} have in common, and how do they differ?",),
        weight=0.8,
        min_objects=2,
    ),
    InstructionKind(
        "mood",
        ("Describe the colors in this image and the mood they create.", "What mood does this picture have? Explain."),
        ("What feeling do the colors of this picture give you, and why?",),
    ),
    InstructionKind(
        "product",
        ("Write a product description for a poster of this image.", "Write an advertisement for a toy that looks like this picture."),
        ("Write the text of an online shop listing for a print of this picture.",),
        weight=0.8,
    ),
    InstructionKind(
        "use",
        ("What could this image be used for? Explain.", "Imagine this picture is a logo. Describe the company it belongs to."),
        ("Where might someone use a picture like this one? Give a few ideas.",),
        weight=0.6,
    ),
)
SPLITS = ("train", "heldout")


def kinds_for(scene: Scene) -> list[InstructionKind]:
    """The kinds that make sense for `scene` (a comparison needs two objects)."""
    return [k for k in KINDS if len(scene.objects) >= k.min_objects]


def instruction_for(scene: Scene, rng: random.Random, split: str = "train", kind: str | None = None) -> tuple[str, str]:
    """(kind name, instruction text) for `scene`: a kind drawn by weight (or `kind`), a wording of `split`, objects filled in."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    options = kinds_for(scene)
    if kind is not None:
        options = [k for k in options if k.name == kind]
        if not options:
            raise ValueError(f"instruction kind {kind!r} does not apply to a scene of {len(scene.objects)} object(s)")
    chosen = rng.choices(options, weights=[k.weight for k in options])[0]
    wording = rng.choice(chosen.train if split == "train" else chosen.heldout)
    named = rng.sample(scene.objects, min(2, len(scene.objects)))
    fill = {"object": named[0].name, "other": named[-1].name}
    return chosen.name, wording.format(**fill)


def all_wordings(split: str) -> set[str]:
    """Every wording of `split` (unfilled): training and held-out never share one."""
    return {w for k in KINDS for w in (k.train if split == "train" else k.heldout)}


__all__ = ["KINDS", "SPLITS", "InstructionKind", "all_wordings", "instruction_for", "kinds_for"]
