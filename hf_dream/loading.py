"""Loading targets by name and turning (image, prompt) examples into their inputs.

A *target spec* is one string, used by every CLI command:
- `tiny:<family>[:<seed>]`: a tiny random VLM of `hf_dream.testing` (tests, demos; no processor),
- `reference:<name>`: an offline reference target of `hf_dream.reference` (e.g. `smolvlm-ref`),
- anything else: a local folder or Hub id for `AutoModelForImageTextToText` + `AutoProcessor`.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

Encoder = Callable[[dict], dict]


def load_target(spec: str, dtype: torch.dtype | str | None = None, device: str | None = None):
    """`(model, processor)` for a target spec (`processor` is None for tiny targets)."""
    if spec.startswith("tiny:"):
        from .testing import build_tiny_target

        _, family, *seed = spec.split(":")
        model, processor = build_tiny_target(family, seed=int(seed[0]) if seed else 0), None
    elif spec.startswith("reference:"):
        from .reference import load_reference_target

        model, processor = load_reference_target(spec.split(":", 1)[1])
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(spec, dtype=dtype or "auto")
        processor = AutoProcessor.from_pretrained(spec)
    if dtype is not None:
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    if device is not None:
        model = model.to(device)
    return model.eval(), processor


def _load_images(image_field, base_dir: Path | None):
    from PIL import Image

    paths = image_field if isinstance(image_field, list) else [] if image_field is None else [image_field]
    images = []
    for path in paths:
        if isinstance(path, Image.Image):
            images.append(path.convert("RGB"))
            continue
        path = Path(path)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.exists():
            raise FileNotFoundError(f"Image not found: {path}")
        images.append(Image.open(path).convert("RGB"))
    return images


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


def read_prompts(path: str | Path) -> list[dict]:
    """Examples from a JSONL file, one `{"image": ..., "prompt": ...}` per line."""
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
        examples.append(example)
    if not examples:
        raise ValueError(f"{path} holds no prompts.")
    return examples
