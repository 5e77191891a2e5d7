"""Loading targets by name and turning (image, prompt) examples into their inputs.

A *target spec* is one string, used by every CLI command:
- `tiny:<family>[:<seed>]`: a tiny random VLM of `hf_dream.testing` (tests, demos; no processor),
- `reference:<name>`: an offline reference target of `hf_dream.reference` (e.g. `smolvlm-ref`),
- anything else: a local folder or Hub id for `AutoModelForImageTextToText` + `AutoProcessor`.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

Encoder = Callable[[dict], dict]


def _valid_forms() -> str:
    from .reference import REFERENCE_TARGETS
    from .testing import SUPPORTED_TINY_FAMILIES

    return (
        "valid target specs: 'tiny:<family>[:<seed>]' (family one of " + ", ".join(SUPPORTED_TINY_FAMILIES) + "), "
        "'reference:<name>' or just '<name>' (" + ", ".join(REFERENCE_TARGETS) + "), "
        "an existing model folder, or a Hub repository id 'owner/name'"
    )


def resolve_target_spec(spec: str) -> tuple[str, str]:
    """`(kind, value)` for a target spec, checked without loading anything: kind is 'tiny' (value: the spec),
    'reference' (value: the reference name; a bare name such as 'smolvlm-ref' counts), 'folder' or 'hub'.
    An unusable spec is a `ValueError` that lists the valid forms."""
    from .reference import REFERENCE_TARGETS
    from .testing import SUPPORTED_TINY_FAMILIES

    spec = str(spec)
    if spec.startswith("tiny:"):
        _, family, *rest = spec.split(":")
        if family not in SUPPORTED_TINY_FAMILIES or len(rest) > 1 or (rest and not rest[0].isdigit()):
            raise ValueError(f"target {spec!r}: not a tiny target; {_valid_forms()}")
        return "tiny", spec
    if spec.startswith("reference:") or spec in REFERENCE_TARGETS:
        name = spec.split(":", 1)[1] if spec.startswith("reference:") else spec
        if name not in REFERENCE_TARGETS:
            raise ValueError(f"target {spec!r}: no reference target {name!r}; {_valid_forms()}")
        return "reference", name
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder", str(path)
    if path.is_absolute() or spec.startswith((".", "~")) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec):
        raise ValueError(f"target {spec!r}: no such folder, and not a Hub id; {_valid_forms()}")
    return "hub", spec


def load_target(spec: str, dtype: torch.dtype | str | None = None, device: str | None = None):
    """`(model, processor)` for a target spec (`processor` is None for tiny targets)."""
    kind, value = resolve_target_spec(spec)
    if kind == "tiny":
        from .testing import build_tiny_target

        _, family, *seed = value.split(":")
        model, processor = build_tiny_target(family, seed=int(seed[0]) if seed else 0), None
    elif kind == "reference":
        from .reference import load_reference_target

        model, processor = load_reference_target(value)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            model = AutoModelForImageTextToText.from_pretrained(value, dtype=dtype or "auto")
            processor = AutoProcessor.from_pretrained(value)
        except OSError as error:
            if kind == "folder":
                raise
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise OSError(f"target {spec!r}: not a local folder, and the Hub could not provide it ({first_line}); {_valid_forms()}") from error
    if dtype is not None:
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    if device is not None:
        model = model.to(device)
    return model.eval(), processor


def load_target_for_server(spec: str):
    """`(model, processor)` for regenerating through a server: what the local side needs (the processor, and a
    model that tells the target's identity). Reference targets load as usual (they are small); a folder or Hub
    target is a weightless skeleton on the meta device, so a 7B target costs no memory here. Tiny targets have
    no tokenizer: refused."""
    kind, value = resolve_target_spec(spec)
    if kind == "tiny":
        raise ValueError(f"target {spec!r}: tiny targets have no tokenizer or chat template, so a server's text answers cannot be tokenized")
    if kind == "reference":
        return load_target(spec)
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, GenerationConfig

    config = AutoConfig.from_pretrained(value)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    try:
        model.generation_config = GenerationConfig.from_pretrained(value)
    except OSError:
        pass  # no generation_config.json: the one derived from the config stays
    return model.eval(), AutoProcessor.from_pretrained(value)


def _resolved_image(image, base_dir: Path | None):
    """A PIL image as it is, or a path made absolute against `base_dir` (checked to exist)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    path = Path(image)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.exists():
        raise FileNotFoundError(f"Image not found: {path}")
    return path


def make_chat_messages(base_dir: str | Path | None = None) -> Callable[[dict], list[dict]]:
    """`to_messages(example) -> OpenAI chat messages` for examples `{"image": ..., "prompt": str}`: one user turn
    with each image inline (a data URL) before the prompt, the layout `make_encoder` gives the chat template."""
    from .training.remote import image_data_url

    base_dir = Path(base_dir) if base_dir is not None else None

    def to_messages(example: dict) -> list[dict]:
        images = [_resolved_image(image, base_dir) for image in _image_paths(example.get("image", example.get("images")))]
        content = [{"type": "image_url", "image_url": {"url": image_data_url(image)}} for image in images]
        return [{"role": "user", "content": content + [{"type": "text", "text": example["prompt"]}]}]

    return to_messages


def _load_images(image_field, base_dir: Path | None):
    from PIL import Image

    images = [_resolved_image(image, base_dir) for image in _image_paths(image_field)]
    return [image.convert("RGB") if isinstance(image, Image.Image) else Image.open(image).convert("RGB") for image in images]


def make_encoder(model, processor, base_dir: str | Path | None = None) -> Encoder:
    """`encode(example) -> target inputs` for examples `{"image": path | [paths] | PIL, "prompt": str}`.

    With a processor, the prompt goes through the model's chat template with one image
    placeholder per image. Tiny targets have no tokenizer: their inputs are drawn from a seed
    (the example's `seed`, or a stable hash of its prompt and image).
    """
    base_dir = Path(base_dir) if base_dir is not None else None
    if processor is None:
        from .testing import make_tiny_inputs

        def encode_tiny(example: dict) -> dict:
            seed = example.get("seed")
            if seed is None:
                seed = zlib.crc32(json.dumps([str(example.get("image")), example.get("prompt")]).encode())
            return make_tiny_inputs(model, seed=int(seed))

        return encode_tiny

    def encode(example: dict) -> dict:
        if "prompt" not in example:
            raise KeyError(f"Example has no 'prompt' field: {sorted(example)}")
        images = _load_images(example.get("image", example.get("images")), base_dir)
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": example["prompt"]}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(text=text, images=images or None, return_tensors="pt")
        return dict(inputs)

    return encode


def _image_paths(image_field) -> list:
    return image_field if isinstance(image_field, list) else [] if image_field is None else [image_field]


def example_image_files(example: dict, base_dir: str | Path | None = None) -> list[Path]:
    """The image files an example names in `image` / `images` (a path or a list; relative paths against
    `base_dir`, else the working directory, as the encoders open them); in-memory images are not files."""
    entries = _image_paths(example.get("image", example.get("images")))
    paths = [Path(entry) for entry in entries if isinstance(entry, (str, os.PathLike))]
    return [path if path.is_absolute() or base_dir is None else Path(base_dir) / path for path in paths]


def read_prompts(path: str | Path, check_images: bool = False) -> list[dict]:
    """Examples from a JSONL file, one `{"image": ..., "prompt": ...}` per line.

    `check_images=True` also checks that every image exists (relative paths: to the file's folder), so that
    a typo is found before any generation, with its line number."""
    path = Path(path)
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(example, dict) or "prompt" not in example:
            raise ValueError(f"{path}:{number}: each line needs a JSON object with a 'prompt' (and usually an 'image').")
        if check_images:
            for image_path in example_image_files(example, path.parent):
                if not image_path.is_file():
                    raise FileNotFoundError(f"{path}:{number}: image not found: {image_path} (paths are relative to the prompts file)")
        examples.append(example)
    if not examples:
        raise ValueError(f"{path} holds no prompts.")
    return examples
