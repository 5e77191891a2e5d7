"""Prompt sets for the reference drafters: training prompts on easy-VQA *train* images, held-out
evaluation prompts on easy-VQA *test* images and on the photos bundled with scikit-image and
scikit-learn. Training and evaluation never share an image or an instruction.

`benchmark_sets` writes the three held-out sets of the v2 benchmarks (new evaluation scenes with the training
instruction mix, new scenes with held-out wordings, the bundled photos):

```python
from hf_dream.reference.prompts import benchmark_sets
benchmark_sets("bench_prompts", num=24)   # bench_prompts/{scenes,scenes-new-wordings,photos}/prompts.jsonl
```

Each set is written as a folder with `prompts.jsonl` (`{"image": relative path, "prompt": ...}`
per line, the format of `hf-dream prepare-data --prompts` and `hf-dream bench --prompts`) and
the images beside it.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from .easy_vqa import load_split
from .instructions import instruction_for
from .scenes import EVAL, scene_from_seed

# Open-ended instructions make long responses, where drafting pays; short easy-VQA questions
# keep the drafter calibrated on the answers the vision tower was trained for.
TRAIN_INSTRUCTIONS = (
    "Describe this image in detail.",
    "Explain what you see in this picture.",
    "Write a short story about the shape in this image.",
    "Write a poem inspired by this picture.",
    "Describe the colors and shapes in the image, then suggest a title for it.",
    "What could the object in this image be used for? Explain your answer.",
    "Imagine this picture is a logo. Describe the company it belongs to.",
    "Explain to a child what is shown in this image.",
    "Give three facts about the shape you see.",
    "Write a product description for a toy that looks like this.",
)
EVAL_INSTRUCTIONS = (
    "Describe everything you can see in this picture.",
    "Tell me a story that starts with this image.",
    "What is happening in this image? Explain in a few sentences.",
    "Write a short paragraph about this picture for a museum guide.",
    "Describe this image to someone who cannot see it.",
)
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "colorwheel", "immunohistochemistry", "hubble_deep_field")
SHORT_QUESTION_FRACTION = 0.4


def training_prompts(num: int, seed: int = 0) -> list[dict]:
    """`num` training examples on easy-VQA train images: ~40% of its own questions, the rest
    open-ended instructions. Image paths are absolute (inside the installed package)."""
    rng = random.Random(seed)
    questions, images = load_split("train")
    examples = []
    for _ in range(num):
        if rng.random() < SHORT_QUESTION_FRACTION:
            question = rng.choice(questions)
            examples.append({"image": str(images[question.image_id]), "prompt": question.question.capitalize()})
        else:
            image_id = rng.choice(sorted(images))
            examples.append({"image": str(images[image_id]), "prompt": rng.choice(TRAIN_INSTRUCTIONS)})
    return examples


def write_prompt_set(examples: list[dict], out_dir: str | Path) -> Path:
    """Copy the images into `out_dir/images/` and write `out_dir/prompts.jsonl` with relative paths."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for example in examples:
        source = Path(example["image"])
        name = f"{source.parent.parent.name}-{source.name}" if source.parent.name == "images" else source.name
        destination = out_dir / "images" / name
        if not destination.exists():
            shutil.copyfile(source, destination)
        lines.append(json.dumps({"image": f"images/{name}", "prompt": example["prompt"]}))
    path = out_dir / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def evaluation_prompts(out_dir: str | Path, num_easy_vqa: int = 12, seed: int = 1) -> Path:
    """Held-out prompt set: easy-VQA *test* images with evaluation-only instructions and short
    questions, plus the bundled scikit-image / scikit-learn photos with open-ended prompts."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    questions, images = load_split("test")
    examples = []
    for index in range(num_easy_vqa):
        if index % 3 == 2:
            question = rng.choice(questions)
            examples.append({"image": str(images[question.image_id]), "prompt": question.question.capitalize()})
        else:
            examples.append({"image": str(images[rng.choice(sorted(images))]), "prompt": rng.choice(EVAL_INSTRUCTIONS)})
    path = write_prompt_set(examples, out_dir)
    lines = path.read_text().splitlines()
    for index, (name, image) in enumerate(_bundled_photos()):
        file = out_dir / "images" / f"{name}.png"
        image.save(file)
        lines.append(json.dumps({"image": f"images/{name}.png", "prompt": EVAL_INSTRUCTIONS[index % len(EVAL_INSTRUCTIONS)]}))
    path.write_text("\n".join(lines) + "\n")
    return path


# v2 benchmark sets: evaluation scene seeds from this index on (the quality report uses the first few hundred)
BENCHMARK_SEED_OFFSET = 100_000
PHOTO_KINDS = ("describe", "story", "mood", "title", "child", "poem", "product")  # kinds that name no scene object
BENCHMARK_SETS = ("scenes", "scenes-new-wordings", "photos")


def benchmark_sets(out_dir: str | Path, num: int = 24, seed: int = 0) -> dict[str, Path]:
    """The three held-out prompt sets of the v2 benchmarks, each a folder `out_dir/<set>/` with `prompts.jsonl` and
    its images: `scenes` (new evaluation scene seeds, instructions of the training mix: training wordings),
    `scenes-new-wordings` (other new evaluation seeds, the held-out wordings no training example uses) and `photos`
    (the scikit-image / scikit-learn photos, each with several held-out open-ended instructions). `num` prompts per
    set; the same arguments write the same files."""
    out_dir = Path(out_dir)
    paths = {}
    for set_index, (name, split) in enumerate((("scenes", "train"), ("scenes-new-wordings", "heldout"))):
        folder = out_dir / name
        (folder / "images").mkdir(parents=True, exist_ok=True)
        lines = []
        for index in range(num):
            scene_seed = EVAL.seed(BENCHMARK_SEED_OFFSET + set_index * 10_000 + seed * num + index)
            scene = scene_from_seed(scene_seed)
            _, text = instruction_for(scene, random.Random(scene_seed), split=split)
            scene.draw().save(folder / "images" / f"scene-{scene_seed}.png")
            lines.append(json.dumps({"image": f"images/scene-{scene_seed}.png", "prompt": text}))
        paths[name] = folder / "prompts.jsonl"
        paths[name].write_text("\n".join(lines) + "\n")
    folder = out_dir / "photos"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    photos = list(_bundled_photos())
    for name, image in photos:
        image.save(folder / "images" / f"{name}.png")
    rng, lines = random.Random(seed), []
    any_scene = scene_from_seed(EVAL.seed(0))  # the photo kinds fill in no object
    for index in range(num):
        name, _ = photos[index % len(photos)]
        _, text = instruction_for(any_scene, rng, split="heldout", kind=PHOTO_KINDS[index % len(PHOTO_KINDS)])
        lines.append(json.dumps({"image": f"images/{name}.png", "prompt": text}))
    paths["photos"] = folder / "prompts.jsonl"
    paths["photos"].write_text("\n".join(lines) + "\n")
    return paths


def _bundled_photos():
    """(name, PIL image) of the photos that ship inside scikit-image and scikit-learn."""
    from PIL import Image

    try:
        import skimage.data
    except ImportError as error:
        raise ImportError("The evaluation photos come from scikit-image: pip install scikit-image") from error
    for name in SKIMAGE_PHOTOS:
        yield f"skimage-{name}", Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        return  # scikit-learn is optional: its two photos are a bonus
    for name, array in zip(("china", "flower"), load_sample_images().images):
        yield f"sklearn-{name}", Image.fromarray(array).convert("RGB")
