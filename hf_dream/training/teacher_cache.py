"""Teacher signals computed once per training row and stored, so that training runs the target once per
row instead of once per step.

On a CPU, or with a small target, a DREAM training step spends most of its time in the frozen target's
teacher-forced pass (the repository's `benchmarks/training/teacher_cost.md` measures a step both ways). That pass is deterministic, so [`TeacherCache`] runs it once per row and keeps what
[`read_teacher`] returns, in safetensors shards under one directory:

- rows are addressed by a digest of their target inputs (not their index), so the train and eval splits,
  a reshuffled dataset, or a dataset that grew by a few hundred rows share what was already computed;
- the directory's name is a digest of everything the signals depend on (the target's identity and weights
  fingerprint, the intermediate-supervision layers, the fused feature layers, autocast and storage dtypes),
  so two trainings that need different signals never read each other's;
- what is stored does not depend on the visual keep ratio (the attention each visual token receives is
  stored and the kept tokens are chosen per batch), nor on the feature noise (added per step);
- logits are not stored (one vocabulary row per token would be the bulk of the cache): they are
  recomputed from the stored final features by the target's own lm_head (`TargetAdapter.logits`);
- filling is resumable (a shard is written to a temporary name and renamed when complete) and shared out
  over the processes of a distributed run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..features import TeacherSignals, read_teacher, select_visual_tokens
from .data import ROW_METADATA, DreamDataCollator

CACHE_FORMAT = 2  # 2: the target's greedy token per position (top1) stored
ROW_KEY_COLUMN = "row_key"
"""Column `DreamTrainer` adds to a dataset whose teacher signals come from a cache: the row's digest (int64)."""

_STORED = ("input_embeds", "features", "mid_features", "mid_layers", "feature_inputs", "importance", "top1")
_INTEGER = {"mid_layers": torch.uint8, "top1": torch.int32}


def row_digest(row: dict) -> int:
    """64-bit digest (a non-negative int64) of a prepared row's target inputs (metadata columns excluded)."""
    digest = hashlib.blake2b(digest_size=8)
    for key in sorted(row):
        if key in ROW_METADATA:
            continue
        value = torch.as_tensor(row[key])
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def with_row_keys(dataset, progress: bool = True):
    """`dataset` with a `row_key` column (each row's [`row_digest`]); unchanged if it already has one."""
    if ROW_KEY_COLUMN in dataset.column_names:
        return dataset
    rows = dataset.with_format("torch")
    keys = [row_digest(rows[index]) for index in tqdm(range(len(rows)), desc="[hf-dream] row digests", disable=not progress)]
    return dataset.add_column(ROW_KEY_COLUMN, keys)


@dataclass(frozen=True)
class TeacherCacheSettings:
    """Everything the stored signals depend on; its digest names the cache's subdirectory.

    Args:
        target: `target_identity(model)` of the teacher (family, build, size, dtype, weights fingerprint).
        candidate_layers: Entropy-selected intermediate supervision: the candidate layers (or `None`).
        static_layer: Static intermediate supervision: the layer (or `None`).
        feature_layers: An EAGLE-3-style drafter's fused target layers (or `None`).
        autocast_dtype: The dtype of the autocast the target pass ran under (`None`: none).
        storage_dtype: The dtype the signals are stored in (`DreamTrainer`: its autocast dtype, else float32;
            bfloat16 halves the disk, and bf16 training casts the drafter's inputs to it anyway).
    """

    target: dict
    candidate_layers: tuple[int, ...] | None
    static_layer: int | None
    feature_layers: tuple[int, ...] | None
    autocast_dtype: str | None
    storage_dtype: str = "bfloat16"

    def digest(self) -> str:
        """16 hex digits naming the cache folder of these settings (the cache format version included)."""
        text = json.dumps({"format": CACHE_FORMAT, **self.__dict__}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class TeacherCache:
    """Stored teacher signals for one [`TeacherCacheSettings`], under `root/<settings digest>/`.

    [`fill`] computes and stores the rows of a dataset not stored yet; [`signals`] assembles a batch's
    [`TeacherSignals`] from its `row_key`s, as [`read_teacher`] would have returned them for that batch.
    """

    def __init__(self, root: str | os.PathLike, settings: TeacherCacheSettings, rows_per_shard: int = 64):
        self.settings = settings
        self.directory = Path(root) / settings.digest()
        self.rows_per_shard = rows_per_shard
        self.directory.mkdir(parents=True, exist_ok=True)
        settings_file = self.directory / "settings.json"
        if not settings_file.exists():
            tmp = settings_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"format": CACHE_FORMAT, **settings.__dict__}, indent=2, default=str) + "\n")
            tmp.replace(settings_file)
        self._index: dict[int, Path] = {}
        self._handles: dict[Path, object] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-read which rows are stored (after other processes wrote shards)."""
        for shard in sorted(self.directory.glob("shard-*.safetensors")):
            if shard in self._handles:
                continue
            handle = safe_open(str(shard), framework="pt")
            self._handles[shard] = handle
            for key in json.loads(handle.metadata()["row_keys"]):
                self._index[int(key)] = shard

    def __contains__(self, key: int) -> bool:
        return int(key) in self._index

    def __len__(self) -> int:
        return len(self._index)

    def missing(self, dataset) -> list[int]:
        """Indices of `dataset`'s rows (which carry `row_key`) whose signals are not stored."""
        return [index for index, key in enumerate(dataset[ROW_KEY_COLUMN]) if int(key) not in self._index]

    # --- filling ---------------------------------------------------------------------------------
    def fill(
        self,
        adapter,
        dataset,
        batch_size: int = 4,
        process_index: int = 0,
        num_processes: int = 1,
        progress: bool = True,
        pad_token_id: int = 0,
    ) -> int:
        """Run the target on the rows of `dataset` not stored yet (in batches of `batch_size` rows of similar
        length) and store their signals; with several processes, process `process_index` computes every
        `num_processes`-th shard (call `refresh()` once all are done). Returns the number of rows computed here."""
        missing = self.missing(dataset)
        if not missing:
            return 0
        lengths = [len(ids) for ids in dataset.select(missing)["input_ids"]]  # one column read, not every row in full
        ordered = [index for _, index in sorted(zip(lengths, missing))]  # similar lengths together: little padding
        shards = [ordered[start : start + self.rows_per_shard] for start in range(0, len(ordered), self.rows_per_shard)]
        mine = shards[process_index::num_processes]
        collator = DreamDataCollator(pad_token_id)
        autocast = self._autocast(adapter)
        bar = tqdm(total=sum(map(len, mine)), desc="[hf-dream] teacher signals", unit="row", disable=not progress)
        for shard_rows in mine:
            tensors, keys = {}, []
            for start in range(0, len(shard_rows), batch_size):
                rows = [dataset[index] for index in shard_rows[start : start + batch_size]]
                batch = collator(rows)
                batch = {name: value.to(adapter.model.device) for name, value in batch.items()}
                with autocast:
                    signals = read_teacher(
                        adapter,
                        batch,
                        candidate_layers=list(self.settings.candidate_layers or []) or None,
                        static_layer=self.settings.static_layer,
                        feature_layers=list(self.settings.feature_layers) if self.settings.feature_layers else None,
                        with_importance=True,
                    )
                for row_in_batch, row in enumerate(rows):
                    key, length = int(row[ROW_KEY_COLUMN]), len(row["input_ids"])
                    keys.append(key)
                    for name in _STORED:
                        value = getattr(signals, name)
                        if value is None:
                            continue
                        value = value[row_in_batch, :length].detach().cpu()
                        value = value.to(_INTEGER.get(name) or self._storage_dtype(name))
                        tensors[f"{key}.{name}"] = value.contiguous()
                bar.update(len(rows))
            self._write_shard(tensors, keys)
        bar.close()
        self.refresh()
        return sum(map(len, mine))

    def _storage_dtype(self, name: str) -> torch.dtype:
        return torch.float32 if name == "importance" else getattr(torch, self.settings.storage_dtype)

    def _autocast(self, adapter):
        dtype = self.settings.autocast_dtype
        return torch.autocast(adapter.model.device.type, dtype=getattr(torch, dtype or "bfloat16"), enabled=dtype is not None)

    def _write_shard(self, tensors: dict, keys: list[int]) -> None:
        name = hashlib.sha256(",".join(map(str, sorted(keys))).encode()).hexdigest()[:16]
        final = self.directory / f"shard-{name}.safetensors"
        tmp = self.directory / f".tmp-{name}-{os.getpid()}.safetensors"
        save_file(tensors, str(tmp), metadata={"row_keys": json.dumps(keys)})
        tmp.replace(final)  # complete shards only: a run killed mid-shard recomputes that shard

    # --- reading ---------------------------------------------------------------------------------
    def _row(self, key: int, name: str) -> torch.Tensor | None:
        shard = self._index.get(int(key))
        if shard is None:
            raise KeyError(
                f"No stored teacher signals for row {int(key)} in {self.directory}: fill the cache with this dataset first "
                "(DreamTrainer does it when it starts)."
            )
        handle = self._handles[shard]
        tensor_name = f"{int(key)}.{name}"
        return handle.get_tensor(tensor_name) if tensor_name in handle.keys() else None

    def signals(self, batch: dict, adapter, keep_ratio: float, logit_rows: torch.Tensor | None = None) -> TeacherSignals:
        """The batch's [`TeacherSignals`] (right-padded rows as `DreamDataCollator` lays them out), with the
        visual tokens kept at `keep_ratio` chosen from the stored attention, and logits from the target's lm_head:
        over the whole vocabulary, or only its `logit_rows` (a draft vocabulary: far cheaper)."""
        keys, length = batch[ROW_KEY_COLUMN].tolist(), batch["input_ids"].shape[1]
        device = batch["input_ids"].device
        stacked = {}
        for name in _STORED:
            rows = [self._row(key, name) for key in keys]
            if any(row is None for row in rows):
                stacked[name] = None
                continue
            padded = [torch.nn.functional.pad(row, (0, 0) * (row.dim() - 1) + (0, length - row.shape[0])) for row in rows]
            stacked[name] = torch.stack(padded).to(device)
        image_mask = adapter.image_token_mask(batch["input_ids"])
        keep = torch.ones_like(image_mask)
        if keep_ratio < 1.0 and bool(image_mask.any()):
            keep = select_visual_tokens(stacked["importance"], image_mask, keep_ratio)
        # logits from the stored features as the live teacher computes them under autocast: in the storage dtype
        features = stacked["features"]
        half = features.dtype in (torch.bfloat16, torch.float16)
        with torch.no_grad(), torch.autocast(device.type, dtype=features.dtype, enabled=half):
            logits = adapter.logits(features, rows=logit_rows)
        # the rest in float32, as the live teacher's hidden states reach the losses (the drafter casts under autocast)
        for name in ("input_embeds", "features", "mid_features", "feature_inputs"):
            if stacked[name] is not None:
                stacked[name] = stacked[name].float()
        mid_layers, top1 = stacked["mid_layers"], stacked["top1"]
        return TeacherSignals(
            input_embeds=stacked["input_embeds"],
            features=stacked["features"],
            logits=logits,
            mid_features=stacked["mid_features"],
            mid_layers=None if mid_layers is None else mid_layers.long(),
            keep=keep,
            feature_inputs=stacked["feature_inputs"],
            top1=None if top1 is None else top1.long(),
            logit_rows=logit_rows,
        )
