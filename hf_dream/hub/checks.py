"""Checks of a drafter folder before anything is uploaded: safe file types, weights that match the config, a valid card."""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..configuration_dream import DreamConfig
from .cards import CardValidationError, _is_repo_id, expected_base_model, validate_card, weight_files
from .remote_code import REMOTE_CODE_MARKER
from .sizing import expected_drafter_tensors

# Files a drafter repository may hold. Everything else is refused rather than uploaded blindly;
# pickle-capable and other non-safetensors weight formats get their own message (loading a pickle can execute code).
ALLOWED_SUFFIXES = (".json", ".md", ".safetensors", ".py", ".yaml", ".yml", ".txt", ".png", ".jpg", ".jpeg", ".svg")
ALLOWED_NAMES = ("LICENSE", "NOTICE", ".gitattributes")
NON_SAFETENSORS_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib", ".h5", ".msgpack", ".gguf", ".onnx")
SKIPPED_DIRS = (".git", ".cache", "__pycache__")  # VCS data, huggingface_hub's upload cache, bytecode


class HubFolderError(ValueError):
    """A drafter folder that must not be uploaded; `problems` lists every reason."""

    def __init__(self, folder: str | Path, problems: list[str]):
        self.folder, self.problems = Path(folder), problems
        super().__init__(f"{folder} is not ready to push:\n" + "\n".join(f"- {p}" for p in problems))


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """`{name: shape}` of a safetensors file, read from its header by `safetensors.safe_open` (no tensor is loaded).

    `safe_open` also validates the file: every byte accounted for by the header, each tensor's byte
    range the size its dtype and shape need. Raises `SafetensorError` on a malformed file.
    """
    with safe_open(str(path), framework="pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


def _check_weights(folder: Path, config: DreamConfig) -> list[str]:
    tensors, problems = {}, []
    for path in weight_files(folder):
        try:
            shapes = tensor_shapes(path)
        except SafetensorError as error:
            problems.append(f"{path.name}: not a valid safetensors file ({error}); save the drafter again with save_pretrained")
            continue
        for name, shape in shapes.items():
            if name in tensors:
                problems.append(f"tensor {name} is stored twice")
            tensors[name] = shape
    if not tensors:
        return problems
    target_like = sorted(name for name in tensors if re.search(r"embed|lm_head", name, flags=re.IGNORECASE))
    if target_like:
        problems.append(
            f"target weights in the drafter files ({', '.join(target_like[:5])}{' ...' if len(target_like) > 5 else ''}): "
            "a drafter uses the target's embeddings and lm_head at run time and must not redistribute them"
        )
    expected = expected_drafter_tensors(config)
    unexpected = sorted(set(tensors) - set(expected) - set(target_like))
    vocab_sized = [name for name in unexpected if config.vocab_size in tensors[name]]
    if vocab_sized:
        problems.append(f"vocabulary-sized tensors look like target weights: {', '.join(vocab_sized[:5])}")
    if unexpected:
        problems.append(f"tensors the config does not define: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        problems.append(f"tensors missing for this config: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    mismatched = [f"{n} {tensors[n]} != {expected[n]}" for n in sorted(set(expected) & set(tensors)) if tensors[n] != expected[n]]
    if mismatched:
        problems.append(f"tensor shapes differ from the config: {'; '.join(mismatched[:5])}")
    # Sizes: names and shapes match the config exactly (above) and `safe_open` accounts for every
    # byte of every file through its header, so nothing else can hide in the files.
    return problems


def _check_remote_code(folder: Path, config_dict: dict, python_files: list[str]) -> list[str]:
    problems = []
    auto_map = config_dict.get("auto_map") or {}
    referenced = {f"{ref.split('.')[0]}.py" for ref in auto_map.values() if isinstance(ref, str)}
    for name in sorted(referenced - set(python_files)):
        problems.append(f"config.json's auto_map needs {name}, which is missing (run `hf-dream card --remote-code`)")
    for name in python_files:
        if not (folder / name).read_text().startswith(REMOTE_CODE_MARKER):
            problems.append(f"{name} was not written by export_remote_code: only generated code is uploaded")
    if python_files and not auto_map:
        problems.append("Python files without an auto_map in config.json: nothing would load them")
    return problems


def check_folder(folder: str | Path) -> list[dict]:
    """Every file that an upload of `folder` would send, as `{"path", "size"}`, after checking it.

    Raises [`HubFolderError`] listing every problem: files other than safetensors weights, JSON,
    Markdown, YAML, images and generated code (pickle-capable formats are named as such); no
    `config.json` of a `DreamConfig`; target weights (tensor names with `embed`/`lm_head`,
    vocabulary-sized tensors); weights that do not match the config, or whose sizes do not add
    up; a missing or invalid card; `*.py` files not written by [`export_remote_code`].
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HubFolderError(folder, [f"{folder} is not a folder"])
    problems, files = [], []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part in SKIPPED_DIRS for part in relative.parts) or not path.is_file():
            continue
        name = relative.as_posix()
        suffix = path.suffix.lower()
        if suffix in NON_SAFETENSORS_SUFFIXES:
            problems.append(f"{name}: {suffix} files may hold pickled code or non-safetensors weights; only safetensors are uploaded")
        elif suffix not in ALLOWED_SUFFIXES and path.name not in ALLOWED_NAMES:
            problems.append(f"{name}: unexpected file type (allowed: {', '.join(ALLOWED_SUFFIXES)})")
        files.append({"path": name, "size": path.stat().st_size})

    config_path = folder / "config.json"
    config_dict, config = {}, None
    if not config_path.exists():
        problems.append("config.json is missing")
    else:
        try:
            config_dict = json.loads(config_path.read_text())
            if config_dict.get("model_type") != DreamConfig.model_type:
                raise ValueError(f"model_type is {config_dict.get('model_type')!r}, not {DreamConfig.model_type!r}")
            config = DreamConfig.from_dict({k: v for k, v in config_dict.items() if k != "auto_map"})
        except ValueError as error:
            problems.append(f"config.json is not a DreamConfig: {error}")
    if config is not None:
        problems += _check_weights(folder, config)
        if not config.target_name_or_path:
            problems.append("config.json does not name its target (target_name_or_path)")
    problems += _check_remote_code(folder, config_dict, [f["path"] for f in files if f["path"].endswith(".py")])

    readme = folder / "README.md"
    if not readme.exists():
        problems.append("README.md (the model card) is missing: write it with `hf-dream card`")
    else:
        try:
            metadata = validate_card(readme.read_text())
            expected = expected_base_model(config.target_name_or_path) if config is not None else None
            # a target loaded from a folder (or a tiny spec) has no Hub id to compare: the card's (`--base-model`) stands
            if config is not None and _is_repo_id(expected) and metadata.get("base_model") != expected:
                problems.append(
                    f"the card's base_model {metadata.get('base_model')!r} is not the config's target "
                    f"{config.target_name_or_path!r}" + (f" (expected {expected!r})" if expected != config.target_name_or_path else "")
                )
        except CardValidationError as error:
            problems.append(f"README.md: {error}")
    if problems:
        raise HubFolderError(folder, problems)
    return files
