"""Procedural scenes: pictures of 1-4 coloured shapes drawn deterministically from a seed, each with a description in words.

They are the image side of the reference targets' instruction data, made the LLaVA way: the
target's frozen *text* model reads `Scene.description()` plus an instruction and writes the
response; the vision part is then trained so that the VLM, shown `Scene.draw()` instead of the
words, gives that response.

```python
from hf_dream.reference.scenes import scene_from_seed, TRAIN, EVAL
scene = scene_from_seed(TRAIN.seed(0))
scene.draw().save("scene.png"); print(scene.description())
```

Seeds of the training and the evaluation split are disjoint ranges (`SeedSplit`), so no evaluation
picture is ever drawn for training.
"""

from __future__ import annotations

import dataclasses
import math
import random

# name -> RGB. Colour names are what the descriptions say, so they are the words a user would use.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (250, 210, 20),
    "orange": (255, 127, 14),
    "purple": (128, 50, 170),
    "pink": (247, 120, 190),
    "brown": (140, 86, 45),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
    "gray": (128, 128, 128),
    "teal": (0, 150, 150),
}
SHAPES = ("circle", "square", "triangle", "star", "rectangle", "diamond", "heart", "hexagon", "cross", "ellipse")
SIZES = {"small": 0.15, "medium": 0.22, "large": 0.32}  # half-extent as a share of the image side
# A 3x3 grid of places, named as a person would say where something is.
PLACES = {
    (0, 0): "in the top left corner", (1, 0): "at the top", (2, 0): "in the top right corner",
    (0, 1): "on the left", (1, 1): "in the center", (2, 1): "on the right",
    (0, 2): "in the bottom left corner", (1, 2): "at the bottom", (2, 2): "in the bottom right corner",
}
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "light gray": (215, 215, 215),
    "light blue": (190, 220, 245),
    "beige": (240, 228, 200),
    "pale green": (205, 235, 200),
    "dark gray": (60, 60, 60),
    "navy blue": (20, 30, 80),
    "black": (15, 15, 15),
}
TEXTURES = ("plain", "stripes", "checkerboard", "dots", "gradient")
TEXTURE_WEIGHTS = (0.55, 0.12, 0.11, 0.11, 0.11)
NUMBER_WORDS = ("zero", "one", "two", "three", "four")


@dataclasses.dataclass(frozen=True)
class SeedSplit:
    """A range of scene seeds that belongs to one split; `seed(i)` is its i-th seed."""

    name: str
    start: int
    size: int

    def seed(self, index: int) -> int:
        """The `index`-th seed of this split (an error past its end, so splits can never overlap)."""
        if not 0 <= index < self.size:
            raise IndexError(f"the {self.name} split has seeds 0..{self.size - 1}, not {index}")
        return self.start + index

    def __contains__(self, seed: int) -> bool:
        return self.start <= seed < self.start + self.size


TRAIN = SeedSplit("train", 0, 10_000_000)
EVAL = SeedSplit("eval", 1_000_000_000, 10_000_000)


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One shape: its kind, colour name, size name, grid cell (column, row) and offset inside the cell (pixels at 128 px)."""

    shape: str
    color: str
    size: str
    cell: tuple[int, int]
    offset: tuple[float, float] = (0.0, 0.0)
    rotation: float = 0.0

    @property
    def name(self) -> str:
        """'red circle'."""
        return f"{self.color} {self.shape}"

    @property
    def place(self) -> str:
        """'in the top left corner'."""
        return PLACES[self.cell]


@dataclasses.dataclass(frozen=True)
class Scene:
    """A background (a colour, optionally with a texture in a second colour) and 1-4 objects in distinct grid cells."""

    seed: int
    background: str
    texture: str
    texture_color: str | None
    objects: tuple[SceneObject, ...]

    # --- words -------------------------------------------------------------------------------
    def background_phrase(self) -> str:
        """'a plain light blue background', 'a white background with gray stripes', ..."""
        if self.texture == "plain":
            return f"a plain {self.background} background"
        if self.texture == "gradient":
            return f"a background that fades from {self.background} to {self.texture_color}"
        kind = {"stripes": "stripes", "checkerboard": "checkerboard pattern", "dots": "dots"}[self.texture]
        article = "a " if self.texture == "checkerboard" else ""
        return f"a {self.background} background with {article}{self.texture_color} {kind}"

    def description(self) -> str:
        """The scene in plain sentences: what the text model reads in place of the picture."""
        n = len(self.objects)
        sentences = [f"The picture has {self.background_phrase()}."]
        things = [f"a {o.size} {o.color} {o.shape} {o.place}" for o in self.objects]
        if n == 1:
            sentences.append(f"There is one object: {things[0]}.")
        else:
            listing = ", ".join(things[:-1]) + f" and {things[-1]}"
            sentences.append(f"There are {NUMBER_WORDS[n]} objects: {listing}.")
        return " ".join(sentences)

    def attributes(self) -> dict[str, list[str]]:
        """Shapes and colours present (sorted, unique): the targets of the vision tower's auxiliary probe."""
        return {"shapes": sorted({o.shape for o in self.objects}), "colors": sorted({o.color for o in self.objects})}

    # --- pixels ------------------------------------------------------------------------------
    def draw(self, size: int = 128):
        """The scene as a `size` x `size` RGB PIL image (drawn at 2x and downsampled: smooth edges)."""
        from PIL import Image, ImageDraw

        scale = 2
        side = size * scale
        image = Image.new("RGB", (side, side), BACKGROUND_COLORS[self.background])
        draw = ImageDraw.Draw(image)
        _draw_texture(draw, side, self)
        for obj in self.objects:
            _draw_object(draw, side, obj)
        return image.resize((size, size), Image.LANCZOS)


    def object_map(self, patches: int = 16, size: int = 128) -> list[list[int]]:
        """Which object each of `patches` x `patches` image patches shows: k + 1 for `objects[k]` (reading order),
        0 for background. A patch shows the object that covers most of it, if that covers at least a quarter
        (later objects are drawn over earlier ones, as in `draw`). The dense targets of vision training's stage 1."""
        from PIL import Image, ImageDraw

        if size % patches:
            raise ValueError(f"size {size} is not a multiple of patches {patches}")
        cell = size // patches
        owner = Image.new("L", (size, size), 0)
        for k, obj in enumerate(self.objects):
            mask = Image.new("RGB", (size, size), (0, 0, 0))
            _draw_object(ImageDraw.Draw(mask), size, obj)
            owner.paste(k + 1, mask=mask.convert("L").point(lambda v: 255 if v else 0))
        import torch

        owners = torch.frombuffer(bytearray(owner.tobytes()), dtype=torch.uint8).view(patches, cell, patches, cell).long()
        counts = torch.stack([(owners == k + 1).sum(dim=(1, 3)) for k in range(len(self.objects))]) if self.objects else None
        if counts is None:
            return [[0] * patches for _ in range(patches)]
        best = counts.max(dim=0)
        shown = torch.where(best.values * 4 >= cell * cell, best.indices + 1, 0)
        return shown.tolist()

def _draw_texture(draw, side: int, scene: Scene) -> None:
    if scene.texture == "plain" or scene.texture_color is None:
        return
    color = COLORS[scene.texture_color]
    rng = random.Random(scene.seed ^ 0x5EED)
    step = side // rng.choice((8, 10, 12))
    if scene.texture == "stripes":
        vertical = rng.random() < 0.5
        for k in range(0, side, 2 * step):
            box = (k, 0, k + step - 1, side) if vertical else (0, k, side, k + step - 1)
            draw.rectangle(box, fill=color)
    elif scene.texture == "checkerboard":
        for i in range(0, side, step):
            for j in range(0, side, step):
                if (i // step + j // step) % 2:
                    draw.rectangle((i, j, i + step - 1, j + step - 1), fill=color)
    elif scene.texture == "dots":
        r = max(2, step // 5)
        for i in range(step // 2, side, step):
            for j in range(step // 2, side, step):
                draw.ellipse((i - r, j - r, i + r, j + r), fill=color)
    elif scene.texture == "gradient":
        start = BACKGROUND_COLORS[scene.background]
        for y in range(side):
            t = y / (side - 1)
            draw.line((0, y, side, y), fill=tuple(round(a + (b - a) * t) for a, b in zip(start, color)))


def _polygon(cx: float, cy: float, r: float, points: list[tuple[float, float]], rotation: float) -> list[tuple[float, float]]:
    c, s = math.cos(rotation), math.sin(rotation)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]


def _draw_object(draw, side: int, obj: SceneObject) -> None:
    cell = side / 3
    cx = (obj.cell[0] + 0.5) * cell + obj.offset[0] * side / 128
    cy = (obj.cell[1] + 0.5) * cell + obj.offset[1] * side / 128
    r = SIZES[obj.size] * side / 2 * 1.0
    color = COLORS[obj.color]
    outline = (0, 0, 0) if obj.color != "black" else (90, 90, 90)
    width = max(1, side // 128)
    shape, rot = obj.shape, obj.rotation
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color, outline=outline, width=width)
    elif shape == "ellipse":
        draw.ellipse((cx - r, cy - 0.6 * r, cx + r, cy + 0.6 * r), fill=color, outline=outline, width=width)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r, [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)], rot * 0.2), fill=color, outline=outline)
    elif shape == "rectangle":
        draw.polygon(_polygon(cx, cy, r, [(-1, -0.55), (1, -0.55), (1, 0.55), (-1, 0.55)], rot * 0.2), fill=color, outline=outline)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, [(0, -1), (0.95, 0.75), (-0.95, 0.75)], rot * 0.2), fill=color, outline=outline)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r, [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)], 0.0), fill=color, outline=outline)
    elif shape == "hexagon":
        pts = [(math.cos(math.pi / 3 * k), math.sin(math.pi / 3 * k)) for k in range(6)]
        draw.polygon(_polygon(cx, cy, r, pts, rot), fill=color, outline=outline)
    elif shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.42) * math.sin(math.pi / 5 * k), -(1.0 if k % 2 == 0 else 0.42) * math.cos(math.pi / 5 * k)) for k in range(10)]
        draw.polygon(_polygon(cx, cy, r, pts, rot * 0.2), fill=color, outline=outline)
    elif shape == "cross":
        a = 0.33
        pts = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]
        draw.polygon(_polygon(cx, cy, r, pts, 0.0), fill=color, outline=outline)
    elif shape == "heart":
        pts = []
        for k in range(40):
            t = 2 * math.pi * k / 40
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x / 17, y / 17 + 0.05))
        draw.polygon(_polygon(cx, cy, r, pts, 0.0), fill=color, outline=outline)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(f"unknown shape {shape!r}")


def _contrasts(color: str, background: str) -> bool:
    """An object colour that stays visible on the background (not the same or a near colour)."""
    near = {
        "white": {"white", "beige", "light gray", "light blue", "pale green"},
        "black": {"black", "navy blue", "dark gray"},
        "gray": {"light gray", "dark gray"},
        "blue": {"navy blue", "light blue"},
        "green": {"pale green"},
        "yellow": {"beige"},
    }
    return background not in near.get(color, set()) and color != background


def scene_from_seed(seed: int, max_objects: int = 4) -> Scene:
    """The scene of `seed`: same seed, same scene, on every machine (Python's `random.Random`)."""
    rng = random.Random(seed)
    n = rng.choices(range(1, max_objects + 1), weights=(0.35, 0.3, 0.2, 0.15)[:max_objects])[0]
    background = rng.choice(sorted(BACKGROUND_COLORS))
    texture = rng.choices(TEXTURES, weights=TEXTURE_WEIGHTS)[0]
    dark = background in ("dark gray", "navy blue", "black")
    texture_color = None
    if texture != "plain":
        options = [c for c in sorted(COLORS) if _contrasts(c, background) and (c != "black" or not dark)]
        texture_color = rng.choice(options)
    cells = rng.sample(sorted(PLACES), n)
    objects = []
    used: set[tuple[str, str]] = set()
    for cell in cells:
        while True:
            shape = rng.choice(SHAPES)
            color = rng.choice([c for c in sorted(COLORS) if _contrasts(c, background) and c != texture_color])
            if (color, shape) not in used:  # names stay unambiguous ("the red circle")
                used.add((color, shape))
                break
        size = rng.choices(tuple(SIZES), weights=(0.3, 0.4, 0.3) if n <= 2 else (0.45, 0.45, 0.1))[0]
        jitter = 10.0 * (1.0 - SIZES[size] / 0.32 * 0.7)
        offset = (rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter))
        objects.append(SceneObject(shape, color, size, cell, offset, rng.uniform(0, 2 * math.pi)))
    # reading order: top to bottom, left to right, as the description lists them
    objects.sort(key=lambda o: (o.cell[1], o.cell[0]))
    return Scene(seed, background, texture, texture_color, tuple(objects))


__all__ = ["COLORS", "EVAL", "PLACES", "SHAPES", "SIZES", "TRAIN", "Scene", "SceneObject", "SeedSplit", "scene_from_seed"]
