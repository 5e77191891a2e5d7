"""Scene transcripts: the token sequence a reference target's image tokens first learn to spell (vision training, stage 1).

The frozen text model reads image tokens best when they *are* the token embeddings of the scene in words
(`benchmarks/reference/smolvlm-ref-v2-attempt3/`: given such tokens SmolLM2-135M names the main object in a
"describe" answer nearly as often as given the description as text; given word vectors laid out on the picture's
grid, almost never). A transcript says what `Scene.description()` says, laid out at fixed offsets so that each
image token always carries the same kind of word (count, then a slot per object, then the background):

    "There are two objects:" | " a small red star at the top," + fill | " a large blue square on the left." + fill |
    " The picture has a plain white background." | fill ...

Objects come in reading order (as in the description) and first, because the answers are about them. Slot widths are
the longest phrase the tokenizer makes of any object, so a slot's start never depends on the words before it; the
text after the last slot is cut at the image block's length.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

from .scenes import COLORS, NUMBER_WORDS, PLACES, SHAPES, SIZES, Scene

MAX_OBJECTS = len(NUMBER_WORDS) - 1


def count_phrase(count: int) -> str:
    """The transcript's first words: how many objects there are ("There are two objects:")."""
    return "There is one object:" if count == 1 else f"There are {NUMBER_WORDS[count]} objects:"


def object_phrase(size: str, color: str, shape: str, place: str, last: bool) -> str:
    """One object's slot text (" a small red star at the top,"; a full stop after the last object)."""
    return f" a {size} {color} {shape} {place}" + ("." if last else ",")


@dataclasses.dataclass(frozen=True)
class TranscriptLayout:
    """Fixed offsets of a transcript for one tokenizer: `count_width` tokens, then `slots` slots of `object_width`
    (`MAX_OBJECTS` when they fit the image block; objects past the last slot are left out), then the background
    sentence; `fill_id` pads each part and the tail; `length` tokens in all."""

    length: int
    count_width: int
    object_width: int
    slots: int
    fill_id: int

    @classmethod
    def for_tokenizer(cls, text_ids: Callable[[str], list[int]], length: int, fill: str = " ") -> TranscriptLayout:
        """The layout for `text_ids` (text -> token ids, no special tokens) and an image block of `length` tokens."""
        fill_ids = text_ids(fill)
        if len(fill_ids) != 1:
            raise ValueError(f"the fill {fill!r} must be one token, got {fill_ids}")
        count_width = max(len(text_ids(count_phrase(n))) for n in range(1, MAX_OBJECTS + 1))
        object_width = max(
            len(text_ids(object_phrase(size, color, shape, place, last)))
            for size, color, shape, place, last in itertools.product(SIZES, COLORS, SHAPES, PLACES.values(), (False, True))
        )
        slots = max(1, min(MAX_OBJECTS, (length - count_width) // object_width))  # tiny test tokenizers: fewer (cut at `length`)
        return cls(length, count_width, object_width, slots, fill_ids[0])

    def ids(self, text_ids: Callable[[str], list[int]], scene: Scene) -> list[int]:
        """The `length` token ids of `scene`'s transcript."""
        def padded(text: str, width: int) -> list[int]:
            piece = text_ids(text)[:width]
            return piece + [self.fill_id] * (width - len(piece))

        count = len(scene.objects)
        ids = padded(count_phrase(count), self.count_width)
        for k, obj in enumerate(scene.objects[: self.slots]):
            ids += padded(object_phrase(obj.size, obj.color, obj.shape, obj.place, k == count - 1), self.object_width)
        ids += text_ids(f" The picture has {scene.background_phrase()}.")
        ids = ids[: self.length]
        return ids + [self.fill_id] * (self.length - len(ids))


__all__ = ["TranscriptLayout", "count_phrase", "object_phrase"]
