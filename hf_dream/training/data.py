"""Training data: regenerate responses with the target (self-distillation) and batch samples.

A *prepared* dataset has one row per conversation:
- `input_ids`: prompt + the target's own response (`int` list),
- `prompt_length`: where the response starts,
- the image inputs the target needs for that prompt (`pixel_values`, `image_sizes`,
  `pixel_attention_mask`, `token_type_ids`, ...), stored as processed arrays so that training
  needs no processor and works for every family the same way.

Storing processed image tensors costs disk (64x64 easy-vqa images: ~50 kB per sample; a
336 px LLaVA image: ~1.4 MB) but keeps the trainer family-agnostic and skips image
preprocessing in the training loop. Teacher *features* are not stored: they are recomputed by
one target forward per batch during training (see `DreamTrainer`), which is cheaper than
reading back `(layers x tokens x hidden)` floats for small targets, and exact for any target.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from datasets import Dataset, concatenate_datasets, load_from_disk
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from tqdm.auto import tqdm

from ..targets import token_type_keys

if TYPE_CHECKING:
    from .remote import ServerRegeneration

# Image tensors pad with 0, except patch positions, where -1 marks padding (Gemma 4's `image_position_ids`).
IMAGE_PAD_VALUES = {"image_position_ids": -1}


def sequence_keys() -> tuple[str, ...]:
    """Keys aligned with the token sequence, padded along it (not concatenated per image): the ids, the
    mask and the token-type marks of every family (the target adapters' `token_type_keys`)."""
    return ("input_ids", "attention_mask", *token_type_keys())


def _pad_to(tensor: torch.Tensor, shape: tuple[int, ...], value: int = 0) -> torch.Tensor:
    padding = []
    for have, want in zip(reversed(tensor.shape), reversed(shape)):
        padding += [0, want - have]
    return torch.nn.functional.pad(tensor, padding, value=value)


def collate_model_inputs(samples: list[dict], padding_side: str = "right", pad_token_id: int = 0) -> dict:
    """Batch per-sample target inputs (each with a leading batch/image dimension).

    Sequence keys are padded on `padding_side`; image tensors are zero-padded to the largest
    shape in every trailing dimension and concatenated along the first one. This is what every
    supported family expects: per-image tensors (LLaVA, Pixtral, Gemma3) concatenate, LLaVA-NeXT
    tiles and Pixtral sizes are sliced back with `image_sizes`, and Idefics3 drops all-zero
    padding images.
    """
    batch: dict[str, torch.Tensor] = {}
    length = max(sample["input_ids"].shape[-1] for sample in samples)
    keys, aligned = list(samples[0]), sequence_keys()
    if "attention_mask" not in keys:
        samples = [dict(sample, attention_mask=torch.ones(sample["input_ids"].shape[-1], dtype=torch.long)) for sample in samples]
        keys.append("attention_mask")
    for key in keys:
        tensors = [torch.as_tensor(sample[key]) for sample in samples]
        if key in aligned:
            value = pad_token_id if key == "input_ids" else 0
            batch[key] = torch.cat([_pad_sequence(t.reshape(1, -1), length, padding_side, value) for t in tensors])
        else:
            shape = tuple(max(sizes) for sizes in zip(*(t.shape for t in tensors)))
            batch[key] = torch.cat([_pad_to(t, (t.shape[0], *shape[1:]), IMAGE_PAD_VALUES.get(key, 0)) for t in tensors])
    return batch


def _pad_sequence(tensor: torch.Tensor, length: int, side: str, value: int) -> torch.Tensor:
    missing = length - tensor.shape[-1]
    return torch.nn.functional.pad(tensor, (missing, 0) if side == "left" else (0, missing), value=value)


ROW_METADATA = ("prompt_length", "source_index", "length", "row_key")
"""Columns of a prepared row that are not target inputs (added by `DreamTrainer`: `length`, for length-grouped
batches, and `row_key`, the row's digest, when the teacher signals come from a `TeacherCache`)."""


def with_lengths(dataset):
    """`dataset` with a `length` column (tokens per row, read from `input_ids` alone), for the Trainer's
    `train_sampling_strategy="group_by_length"` / `"batch_rebalance"`, which otherwise reads every row in full."""
    if not isinstance(dataset, Dataset) or "length" in dataset.column_names:
        return dataset
    return dataset.add_column("length", [len(ids) for ids in dataset["input_ids"]])


class DreamDataCollator:
    """Collates prepared rows into a training batch: right-padded target inputs plus
    `prompt_lengths` and `sequence_lengths` (for the response mask), and `row_key` where rows have one."""

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        # sequence-aligned keys stay 1-D here: `collate_model_inputs` lays them out as (1, length) rows
        samples = [{key: torch.as_tensor(value) for key, value in row.items() if key not in ROW_METADATA} for row in rows]
        batch = collate_model_inputs(samples, "right", self.pad_token_id)
        batch["prompt_lengths"] = torch.tensor([int(row["prompt_length"]) for row in rows])
        batch["sequence_lengths"] = torch.tensor([len(row["input_ids"]) for row in rows])
        if "row_key" in rows[0]:
            batch["row_key"] = torch.tensor([int(row["row_key"]) for row in rows])
        return batch


def response_mask(batch: dict) -> torch.Tensor:
    """True at positions whose *next* token is a response token: where a drafter's prediction
    is trained (position p predicts token p + 1)."""
    length = batch["input_ids"].shape[1]
    positions = torch.arange(length, device=batch["input_ids"].device)[None]
    start = batch["prompt_lengths"][:, None].to(positions.device) - 1
    end = batch["sequence_lengths"][:, None].to(positions.device) - 1
    return (positions >= start) & (positions < end)


# --- regeneration ----------------------------------------------------------------------------
Encoder = Callable[[dict], dict]


def eos_token_ids(model) -> set[int]:
    """The ids that end a response in `model`'s generation config (an empty set when it names none)."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def regenerate_batch(model, encoded: list[dict], max_new_tokens: int, pad_token_id: int, **generate_kwargs) -> list[dict]:
    """Generate responses for a batch of encoded prompts (left-padded); returns prepared rows."""
    batch = collate_model_inputs(encoded, "left", pad_token_id)
    batch = {key: value.to(model.device) for key, value in batch.items()}
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, **generate_kwargs)
    width = batch["input_ids"].shape[1]
    eos = eos_token_ids(model)
    rows = []
    for index, sample in enumerate(encoded):
        response = output[index, width:].tolist()
        # finished rows are padded after their EOS: cut there
        cut = next((i for i, token in enumerate(response) if token in eos), None)
        rows.append(response_row(sample, response if cut is None else response[: cut + 1]))
    return rows


def response_row(sample: dict, response: list[int]) -> dict:
    """A prepared row: the encoded prompt `sample` (batch dimension 1) followed by the `response` token ids."""
    prompt = sample["input_ids"].reshape(-1).tolist()
    # numpy arrays keep the processor's dtype (float32) in the Arrow schema; lists would become float64
    aligned = sequence_keys()
    row = {key: torch.as_tensor(value).cpu().numpy() for key, value in sample.items() if key not in aligned}
    row["input_ids"] = prompt + list(response)
    row["prompt_length"] = len(prompt)
    for key in token_type_keys():
        if key in sample:
            row[key] = torch.as_tensor(sample[key]).reshape(-1).tolist() + [0] * len(response)  # response tokens are text
    return row


def prepare_dataset(
    model,
    source: Dataset | Iterable[dict],
    encode: Encoder,
    output_dir: str | os.PathLike,
    max_new_tokens: int = 256,
    batch_size: int = 4,
    shard_size: int = 64,
    do_sample: bool = False,
    pad_token_id: int | None = None,
    show_progress: bool = True,
    target_spec: str | None = None,
    server: ServerRegeneration | None = None,
    image_dir: str | os.PathLike | None = None,
    on_shard_saved: Callable[[int], object] | None = None,
    **generate_kwargs,
) -> Dataset:
    """Regenerate the responses of `source` with `model` and save a training-ready dataset.

    `encode(example)` turns one source example into the target's inputs for the prompt
    (batch dimension 1). Work is written in shards of `shard_size` examples under
    `output_dir/shards/`, each one atomically: an interrupted run restarts at the first missing
    shard and loses nothing; greedy regeneration (the default) makes the result identical to
    an uninterrupted run. The final dataset is saved to `output_dir/dataset`.

    `output_dir/settings.json` records every setting, a hash of the source examples and the target's identity
    (model type, build, dtype, a fingerprint of its weights; `target_spec` is recorded to name it): resuming
    with another target, edited prompts or other settings is refused before any generation, naming the
    difference, so that one dataset never mixes two runs. `on_shard_saved(shard)` is called after each shard this
    run writes (e.g. to export what is finished). The hash covers the contents of the image files the
    examples name by path (`image_dir`: the folder relative paths are resolved against, as `encode` opens them;
    default: the working directory), so an image edited in place is a difference too.

    `server` ([`ServerRegeneration`]): the responses come from an OpenAI-compatible chat endpoint instead of
    `model.generate()` (greedy, up to `ServerSettings.concurrency` requests in flight, a shard at a time), and are
    tokenized with the target's tokenizer; `model` then only provides the target's identity (it may be a
    weightless skeleton) and settings.json records the served model's name (compared on resume) and the URL.

    Under `torchrun` / `accelerate launch` (`WORLD_SIZE` > 1) rank `r` regenerates the missing shards `i` with
    `i % WORLD_SIZE == r`: ranks never share a shard, the shards (and the final dataset, written by rank 0 once
    every shard exists) are the single-process run's, and a rerun resumes with any number of ranks.
    """
    output_dir = Path(output_dir)
    shard_dir = output_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    examples = list(source)
    if not examples:
        raise ValueError("The source dataset is empty: nothing to regenerate.")
    if pad_token_id is None:
        pad_token_id = model.generation_config.pad_token_id
        if pad_token_id is None:
            pad_token_id = min(eos_token_ids(model) or {0})
    if server is not None and (do_sample or generate_kwargs):
        raise ValueError("Regeneration through a server is greedy and takes no generate() options.")
    settings = {
        "max_new_tokens": max_new_tokens, "do_sample": do_sample, "num_examples": len(examples), "shard_size": shard_size,
        "batch_size": None if server is not None else batch_size, "pad_token_id": int(pad_token_id),
        "generate_kwargs": json.loads(json.dumps(generate_kwargs, sort_keys=True, default=repr)),
        "source_sha256": source_digest(examples),
        "images_sha256": image_files_digest(examples, image_dir),
        "target": target_identity(model, with_weights=server is None),
    }
    if server is not None:
        settings["server"] = server.record()
    where = None if server is None else {"server_url": server.client.settings.api_base}
    ranks = DataRanks.from_environment()
    # every rank compares (they all refuse a mismatch alike); only rank 0 writes a new settings.json
    _check_settings(output_dir, settings, target_spec, recorded_only=where, write=ranks.rank == 0)

    num_shards = (len(examples) + shard_size - 1) // shard_size
    mine = [shard for shard in range(num_shards) if shard % ranks.world_size == ranks.rank and not (shard_dir / f"{shard:05d}").exists()]
    total = sum(len(examples[shard * shard_size : (shard + 1) * shard_size]) for shard in mine)
    progress = tqdm(total=total, desc=f"regenerating{ranks.label}", disable=not show_progress)
    for shard in mine:
        first = shard * shard_size
        shard_examples = examples[first : first + shard_size]
        rows = []
        step = len(shard_examples) if server is not None else batch_size
        for start in range(0, len(shard_examples), step):
            chunk = shard_examples[start : start + step]
            encoded = [encode(example) for example in chunk]
            if server is not None:
                chunk_rows = [response_row(sample, ids) for sample, ids in zip(encoded, server.response_ids(chunk, max_new_tokens))]
            else:
                chunk_rows = regenerate_batch(model, encoded, max_new_tokens, pad_token_id, do_sample=do_sample, **generate_kwargs)
            for offset, row in enumerate(chunk_rows):
                row["source_index"] = first + start + offset
                rows.append(row)
            progress.update(len(chunk))
        write_shard(rows, shard_dir, shard)
        if on_shard_saved is not None:
            on_shard_saved(shard)
    progress.close()

    final = output_dir / "dataset"
    ranks.wait()  # every rank's shards are written
    if ranks.rank == 0:
        dataset = concatenate_datasets([load_from_disk(str(shard_dir / f"{i:05d}")) for i in range(num_shards)])
        shutil.rmtree(final, ignore_errors=True)
        _quiet_save(dataset, final)
    ranks.wait()  # the final dataset is written
    return load_from_disk(str(final))


def write_shard(rows: list[dict], shard_dir: Path, shard: int) -> Path:
    """Save prepared `rows` as shard number `shard` of `shard_dir`, atomically: a shard is either complete or absent."""
    tmp = shard_dir / f".{shard:05d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _quiet_save(Dataset.from_list(rows), tmp)
    final = shard_dir / f"{shard:05d}"
    tmp.rename(final)
    return final


@dataclass
class DataRanks:
    """This process's place among the processes of a `torchrun` / `accelerate launch` run (one process: 0 of 1).

    With several processes, `wait()` is a barrier of the `torch.distributed` group (gloo, created here with a
    day-long timeout unless the launcher's script made one: regenerating a shard may take long)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_environment(cls) -> DataRanks:
        """This process's ranks from the launcher's `WORLD_SIZE` (joining, or creating, the process group)."""
        import torch.distributed as dist

        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=1))
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size())

    @property
    def label(self) -> str:
        """' (rank r/N)' for progress bars, '' for one process."""
        return "" if self.world_size == 1 else f" (rank {self.rank}/{self.world_size})"

    def wait(self) -> None:
        """Wait until every rank gets here (a no-op for one process)."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


def _quiet_save(dataset: Dataset, path: Path) -> None:
    """save_to_disk without its own progress bar (ours already reports progress)."""
    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        dataset.save_to_disk(str(path))
    finally:
        if not was_disabled:
            enable_progress_bars()


def source_digest(examples: list) -> str:
    """SHA-256 of the source examples (prompts, image paths or image pixels, every field), in order."""
    digest = hashlib.sha256()
    for example in examples:
        _feed(digest, example)
    return digest.hexdigest()


def _feed(digest, value) -> None:
    if isinstance(value, dict):
        digest.update(b"{")
        for key in sorted(value, key=str):
            digest.update(json.dumps(str(key)).encode())
            _feed(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    elif hasattr(value, "tobytes") and hasattr(value, "mode") and hasattr(value, "size"):  # a PIL image
        digest.update(f"image:{value.mode}:{value.size}".encode())
        digest.update(value.tobytes())
    elif isinstance(value, torch.Tensor):
        digest.update(f"tensor:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    elif hasattr(value, "tobytes") and hasattr(value, "dtype"):  # numpy
        digest.update(f"array:{value.dtype}:{value.shape}".encode())
        digest.update(value.tobytes())
    elif isinstance(value, bytes):
        digest.update(b"bytes:" + value)
    else:
        digest.update(json.dumps(value, default=repr).encode())
    digest.update(b";")


def image_files_digest(examples: list, image_dir: str | os.PathLike | None = None) -> str:
    """SHA-256 of the contents of the image files the examples name by path (`image` / `images`; relative paths
    against `image_dir`), in order: editing an image in place changes it, though its path stays. Each file is
    read once per call however many examples name it, in blocks; a missing file counts as missing (tiny targets
    never open theirs)."""
    from ..loading import example_image_files

    file_digests: dict[Path, str] = {}
    digest = hashlib.sha256()
    for example in examples:
        for path in example_image_files(example, image_dir) if isinstance(example, dict) else ():
            if path not in file_digests:
                file_digests[path] = _file_sha256(path) if path.is_file() else "missing"
            digest.update(f"{file_digests[path]};".encode())
        digest.update(b"|")
    return digest.hexdigest()


def _file_sha256(path: Path, block_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()


def target_identity(model, with_weights: bool = True) -> dict:
    """What identifies the model that regenerated a dataset: its family, build, size, dtype and a fingerprint of
    its weights (a few thousand values of its first, middle and last tensors: cheap, and different for two seeds
    or two checkpoints of one architecture). `with_weights=False` (regeneration through a server, whose weights
    are not the local ones; `model` may be a skeleton on the meta device): family, build and size only."""
    from ..targets import get_target_adapter

    adapter = get_target_adapter(model)
    identity = {
        "model_type": model.config.model_type,
        "build": adapter.build_id,
        "num_hidden_layers": adapter.num_hidden_layers,
        "vocab_size": adapter.vocab_size,
    }
    if not with_weights:
        return identity
    params = [p for _, p in model.named_parameters()]
    digest = hashlib.sha256()
    for param in (params[0], params[len(params) // 2], params[-1]) if params else ():
        sample = param.detach().reshape(-1)[:4096].float().cpu().contiguous()
        digest.update(str(tuple(param.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return {**identity, "dtype": str(next(iter(params)).dtype) if params else None, "weights_fingerprint": digest.hexdigest()[:16]}


def recorded_settings(path: str | os.PathLike) -> dict | None:
    """The settings a `prepare_dataset` output folder recorded (`path` is the folder or its `dataset`), or None."""
    path = Path(path)
    for folder in (path, path.parent):
        settings = folder / "settings.json"
        if settings.is_file() and (folder / "shards").is_dir():
            return json.loads(settings.read_text())
    return None


_LABELS = {
    "source_sha256": "the source examples differ (prompts edited, added, removed, reordered, or other images)",
    "images_sha256": "the image files differ (an image the prompts name was edited or replaced in place)",
    "target": "another target",
}


def _describe_difference(key: str, before, now, previous: dict, target_spec: str | None) -> str:
    if key == "server":
        def how(record):
            return f"through the server's model {record['model']!r}" if record else "locally"

        return f"the folder was regenerated {how(before)}, this run regenerates {how(now)}"
    if before is None:
        return f"{key}: not recorded by the earlier run (made by an older hf-dream), now {now!r}"
    if key == "target":
        fields = ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k))
        was = previous.get("target_spec") or "unrecorded spec"
        return f"another target: the folder was made with {was}, now {target_spec or 'this model'} ({fields})"
    if key in _LABELS:
        return _LABELS[key]
    return f"{key}: {before!r} before, {now!r} now"


def _check_settings(
    output_dir: Path, settings: dict, target_spec: str | None = None, recorded_only: dict | None = None, write: bool = True
) -> None:
    """Refuse to resume a run with different settings, source or target (it would mix two datasets).
    `recorded_only` is written to a new settings.json but never compared (where a server listens); `write=False`
    only compares."""
    path = output_dir / "settings.json"
    if path.exists():
        previous = json.loads(path.read_text())
        # a key only the earlier run has counts too (e.g. `server`: resuming a server run locally)
        keys = list(settings) + sorted(set(previous) - set(settings) - set(recorded_only or {}) - {"target_spec"})
        differences = [
            _describe_difference(key, previous.get(key), settings.get(key), previous, target_spec)
            for key in keys
            if previous.get(key) != settings.get(key)
        ]
        if differences:
            raise ValueError(
                f"{output_dir} holds a run that does not match this one, so resuming would mix two datasets: "
                + "; ".join(differences)
                + ". Rerun with the earlier settings, use another --output folder, or delete this one."
            )
    elif write:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**settings, **(recorded_only or {}), "target_spec": target_spec}, indent=1, sort_keys=True))
        tmp.rename(path)
