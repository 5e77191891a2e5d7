"""`DreamTrainer`: distils a target VLM into a DREAM drafter with transformers' `Trainer`.

Everything distributed (DDP through `torchrun` / `accelerate launch`, FSDP, DeepSpeed, mixed
precision, gradient accumulation, checkpointing) is the `Trainer`'s own machinery; this module
adds the frozen teacher, the DREAM losses and DREAM-specific evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments

from ..features import read_teacher
from ..modeling_dream import DreamDraftModel
from ..targets import token_type_keys
from .data import ROW_METADATA, DreamDataCollator, response_mask, target_identity, with_lengths
from .losses import dream_losses, top1_agreement
from .teacher_cache import TeacherCache, TeacherCacheSettings, with_row_keys

MID_SUPERVISION = ("entropy", "static", "none")
LENGTH_STRATEGIES = ("group_by_length", "batch_rebalance")  # Trainer sampling strategies that read row lengths


@dataclass
class DreamTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus DREAM's loss weights and ablation switches.

    The optimiser defaults follow the paper (AdamW, betas (0.9, 0.95), lr 3e-5, grad clip 0.5);
    at the small scale of a CPU run a larger learning rate (e.g. 5e-4) converges far faster.
    """

    w_final: float = field(default=0.2, metadata={"help": "Weight of SmoothL1(draft final feature, target last-layer feature)."})
    w_mid: float = field(
        default=0.2, metadata={"help": "Weight of SmoothL1(draft first-block output, target intermediate feature)."}
    )
    w_kl: float = field(default=1.0, metadata={"help": "Weight of KL(target || draft) on next-token distributions."})
    mid_supervision: str = field(
        default="entropy",
        metadata={
            "help": "Intermediate target: 'entropy' (per token, the candidate layer with the lowest attention "
            "entropy), 'static' (the fixed layer at `static_layer_depth`), or 'none' (no intermediate loss)."
        },
    )
    static_layer_depth: float = field(
        default=0.5, metadata={"help": "With mid_supervision='static': depth fraction of the fixed layer (0.25/0.5/0.75)."}
    )
    feature_noise: float = field(
        default=0.0,
        metadata={"help": "Width of uniform noise added to the target features the drafter attends to (EAGLE uses 0.2)."},
    )
    ttt_steps: int = field(
        default=1,
        metadata={
            "help": "Training-time test: every training position is drafted at depths 1..N at once, each depth "
            "reading the drafter's own features and keys of the chain's earlier depths as decoding does "
            "(`DreamDraftModel.forward_unrolled`); 1 = teacher-forced training only."
        },
    )
    ttt_decay: float = field(
        default=0.8, metadata={"help": "With ttt_steps > 1: depth j's loss is weighted ttt_decay**(j - 1) (normalised to sum 1)."}
    )
    teacher_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Directory of stored teacher signals (`TeacherCache`): the target runs once per row (when training "
            "starts, for the rows not stored yet) instead of once per step, and later trainings with the same target "
            "and supervision layers reuse them, whatever their keep ratio, noise or fusion. Needs disk: about "
            "3 x hidden size x 2 bytes per token. None (default): the target runs every step."
        },
    )
    acceptance_eval_samples: int = field(
        default=4, metadata={"help": "Eval prompts on which evaluate() measures the real acceptance length via generate()."}
    )
    acceptance_max_new_tokens: int = field(default=32, metadata={"help": "max_new_tokens of that measurement."})
    learning_rate: float = field(default=3e-5, metadata={"help": "Peak learning rate (paper: 3e-5)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (paper: 0.95)."})
    max_grad_norm: float = field(default=0.5, metadata={"help": "Gradient clipping (paper: 0.5)."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the teacher needs columns the drafter's forward does not take."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP: every trainable drafter parameter takes part in every step (tested), so the extra "
            "autograd traversal that looks for unused ones is off."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.mid_supervision not in MID_SUPERVISION:
            raise ValueError(f"mid_supervision must be one of {MID_SUPERVISION}, got {self.mid_supervision!r}.")
        if not 0.0 < self.static_layer_depth < 1.0:
            raise ValueError(f"static_layer_depth must be in (0, 1), got {self.static_layer_depth}.")
        if self.ttt_steps < 1:
            raise ValueError(f"ttt_steps must be at least 1 (1: no training-time test), got {self.ttt_steps}.")
        if not 0.0 < self.ttt_decay <= 1.0:
            raise ValueError(f"ttt_decay must be in (0, 1], got {self.ttt_decay}.")
        if self.train_sampling_strategy in LENGTH_STRATEGIES and self.length_column_name != "length":
            raise ValueError(
                f"DreamTrainer adds the row lengths itself as column 'length'; got length_column_name={self.length_column_name!r}."
            )


def gather_positions(keep: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Original positions of the kept tokens per row, left-aligned and right-padded:
    `(positions (b, k), slot_mask (b, k))`."""
    batch, length = keep.shape
    keep = keep & attention_mask.bool()
    counts = keep.sum(1)
    arange = torch.arange(length, device=keep.device)
    # kept positions first (in order), then the rest
    order = torch.argsort(torch.where(keep, arange, arange + length), dim=1)
    width = int(counts.max())
    positions = order[:, :width]
    slot_mask = torch.arange(width, device=keep.device)[None] < counts[:, None]
    return torch.where(slot_mask, positions, 0), slot_mask


def _gather(tensor: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return torch.gather(tensor, 1, positions[..., None].expand(-1, -1, tensor.shape[-1]))


class DreamTrainer(Trainer):
    """Trains `model` (a [`DreamDraftModel`]) to draft for `teacher` (the target VLM).

    The teacher is frozen, prepared by the accelerator for evaluation (no gradients, no optimiser
    state) and run teacher-forced on the prepared sequences to produce the supervision (features,
    logits, entropy-selected intermediate states, visual-token ranking): once per batch, or, with
    `args.teacher_cache_dir`, once per row when training starts ([`TeacherCache`]).
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

    def __init__(self, model: DreamDraftModel, teacher, args: DreamTrainingArguments, data_collator=None, **kwargs):
        if not isinstance(model, DreamDraftModel):
            raise TypeError(f"DreamTrainer trains a DreamDraftModel, got {type(model).__name__}.")
        if not isinstance(args, DreamTrainingArguments):
            raise TypeError("DreamTrainer needs DreamTrainingArguments (loss weights, ablation switches).")
        teacher.eval().requires_grad_(False)
        model.attach_target(teacher)
        pad = teacher.generation_config.pad_token_id
        columns = []
        if args.train_sampling_strategy in LENGTH_STRATEGIES:  # rows of similar length together: less padding per batch
            columns.append(with_lengths)
        if args.teacher_cache_dir:  # rows addressed by content in the cache
            columns.append(lambda dataset: with_row_keys(dataset, progress=not args.disable_tqdm))
        for add_column in columns:
            for key in ("train_dataset", "eval_dataset"):
                if isinstance(kwargs.get(key), dict):
                    kwargs[key] = {name: add_column(split) for name, split in kwargs[key].items()}
                elif kwargs.get(key) is not None:
                    kwargs[key] = add_column(kwargs[key])
        super().__init__(model=model, args=args, data_collator=data_collator or DreamDataCollator(pad or 0), **kwargs)
        self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        self.adapter = model.target_adapter
        self._configure_supervision(model)
        self._metrics: dict[str, list[float]] = {}
        self.teacher_cache = self._fill_teacher_cache(model, pad or 0) if args.teacher_cache_dir else None

    def _fill_teacher_cache(self, model: DreamDraftModel, pad_token_id: int) -> TeacherCache:
        args = self.args
        autocast = "bfloat16" if args.bf16 else "float16" if args.fp16 else None
        settings = TeacherCacheSettings(
            target=target_identity(self.adapter.model),
            candidate_layers=None if self.candidate_layers is None else tuple(self.candidate_layers),
            static_layer=self.static_layer,
            feature_layers=None if model.config.feature_layers is None else tuple(model.config.feature_layers),
            autocast_dtype=autocast,
            storage_dtype=autocast or "float32",  # what the drafter computes in: bf16 training casts its inputs anyway
        )
        cache = TeacherCache(args.teacher_cache_dir, settings)
        eval_sets = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        for dataset in [self.train_dataset, *eval_sets]:
            if dataset is None:
                continue
            # every process lists the missing rows before any writes: they share out the same shards
            missing = len(cache.missing(dataset))
            self.accelerator.wait_for_everyone()
            if missing and args.process_index == 0:
                print(f"[hf-dream] teacher signals: {missing:,} of {len(dataset):,} rows to compute into {cache.directory}")
            cache.fill(
                self.adapter,
                dataset,
                batch_size=args.per_device_eval_batch_size,
                process_index=args.process_index,
                num_processes=args.world_size,
                progress=not args.disable_tqdm,
                pad_token_id=pad_token_id,
            )
            self.accelerator.wait_for_everyone()
            cache.refresh()
            if cache.missing(dataset):
                raise RuntimeError(f"{len(cache.missing(dataset))} rows are still missing from the teacher cache {cache.directory}.")
        return cache

    def _configure_supervision(self, model: DreamDraftModel) -> None:
        args, config = self.args, model.config
        self.candidate_layers = self.static_layer = None
        if args.mid_supervision == "entropy" and args.w_mid > 0:
            self.candidate_layers = list(config.entropy_candidate_layers)
        elif args.mid_supervision == "static" and args.w_mid > 0:
            self.static_layer = max(1, round(args.static_layer_depth * self.adapter.num_hidden_layers))
            config.static_feature_layer = self.static_layer  # recorded with the saved drafter

    # --- loss ------------------------------------------------------------------------------
    def _batch_outputs(self, model, inputs):
        config = self.accelerator.unwrap_model(model).config
        if self.teacher_cache is not None:
            # logits on the draft vocabulary only: the full-vocabulary ones would cost more than the drafter's step
            draft_vocab = self.accelerator.unwrap_model(model).draft_vocab
            teacher = self.teacher_cache.signals(inputs, self.adapter, config.visual_keep_ratio, logit_rows=draft_vocab)
        else:
            teacher = read_teacher(
                self.adapter,
                inputs,
                candidate_layers=self.candidate_layers,
                static_layer=self.static_layer,
                keep_ratio=config.visual_keep_ratio,
                feature_layers=config.feature_layers,
            )
        positions, slot_mask = gather_positions(teacher.keep, inputs["attention_mask"])
        # what the drafter reads: the last layer, or (EAGLE-3-style) several layers its forward fuses
        features = teacher.features if teacher.feature_inputs is None else teacher.feature_inputs
        if self.args.feature_noise > 0 and model.training:
            features = features + (torch.rand_like(features) - 0.5) * self.args.feature_noise
        # the target's own rotary positions of the kept tokens (3-D for M-RoPE; the index itself for 1-D targets)
        rotary = self.adapter.rotary_position_ids(inputs["input_ids"], inputs["attention_mask"], inputs)
        rotary = rotary.to(positions.device).gather(2, positions[None].expand(rotary.shape[0], -1, -1))
        draft_inputs = dict(
            inputs_embeds=_gather(teacher.input_embeds, positions),
            position_ids=positions,
            target_features=features,
            attention_mask=slot_mask.long(),
            rotary_position_ids=rotary,
        )
        mask = slot_mask & torch.gather(response_mask(inputs), 1, positions)
        if self.args.ttt_steps > 1:  # every depth of the training-time test, each on the chains decoding could draft
            drafts = model(**draft_inputs, unrolled_steps=self.args.ttt_steps)
            masks = [mask & DreamDraftModel.unrolled_chain_mask(positions, depth, slot_mask) for depth in range(1, len(drafts) + 1)]
        else:
            drafts, masks = [model(**draft_inputs)], [mask]
        gathered = {
            "logits": _gather(teacher.logits, positions),
            "top1": None if teacher.top1 is None else torch.gather(teacher.top1, 1, positions),
            "logit_rows": teacher.logit_rows,
            "features": _gather(teacher.features, positions),
            "mid": None if teacher.mid_features is None else _gather(teacher.mid_features, positions),
        }
        return drafts, gathered, masks, teacher

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        drafts, gathered, masks, teacher = self._batch_outputs(model, inputs)
        draft_vocab = self.accelerator.unwrap_model(model).draft_vocab
        # with a reduced draft vocabulary the KL compares the target's distribution renormalised on it
        on_draft_vocab = draft_vocab is None or gathered["logit_rows"] is not None
        kl_logits = gathered["logits"] if on_draft_vocab else gathered["logits"][..., draft_vocab]
        teacher_top1 = gathered["top1"] if gathered["top1"] is not None else gathered["logits"]
        args = self.args
        prefix = "" if model.training else "eval_"
        weights = [args.ttt_decay**depth for depth in range(len(drafts))]
        loss = 0.0
        for depth, (draft, mask, weight) in enumerate(zip(drafts, masks, weights), start=1):
            losses = dream_losses(draft, kl_logits, gathered["features"], gathered["mid"], mask)
            depth_loss = args.w_kl * losses["kl"] + args.w_final * losses["final"]
            if "mid" in losses:
                depth_loss = depth_loss + args.w_mid * losses["mid"]
            loss = loss + weight / sum(weights) * depth_loss
            agree, total = top1_agreement(teacher_top1, draft.logits.detach(), mask, draft_vocab)
            suffix = "" if depth == 1 else f"_depth{depth}"  # depth 1: the teacher-forced numbers, named as without ttt
            if depth == 1:
                for name, value in losses.items():
                    self._metrics.setdefault(f"{prefix}loss_{name}", []).append(float(value.detach()))
            else:
                self._metrics.setdefault(f"{prefix}loss{suffix}", []).append(float(depth_loss.detach()))
            self._metrics.setdefault(f"{prefix}top1_agreement{suffix}", []).append(agree / max(total, 1))
        return (loss, drafts[0]) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        prefix = "eval_" if any(key.startswith("eval_") for key in logs) else ""
        for key, values in list(self._metrics.items()):
            if key.startswith("eval_") == bool(prefix) and values:
                logs[key] = sum(values) / len(values)
                del self._metrics[key]
        super().log(logs, *args, **kwargs)

    # --- evaluation ------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Teacher-forced losses and top-1 agreement (transformers' eval loop), plus the real
        acceptance length of `generate(assistant_model=drafter)` on a few eval prompts."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is not None and self.args.acceptance_eval_samples > 0:
            self._metrics[f"{metric_key_prefix}_acceptance_length"] = [self.acceptance_length(dataset)]
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def acceptance_length(self, dataset, num_samples: int | None = None, max_new_tokens: int | None = None) -> float:
        """Mean acceptance length (new tokens per target pass, bonus token included) of DREAM
        greedy decoding on the prompts of the first `num_samples` rows of `dataset`."""
        drafter = self.accelerator.unwrap_model(self.model)
        return measure_acceptance_length(
            self.teacher,
            drafter,
            dataset,
            num_samples or self.args.acceptance_eval_samples,
            max_new_tokens or self.args.acceptance_max_new_tokens,
        )


def prompt_inputs(row: dict, device) -> dict:
    """Target inputs for the prompt part of a prepared row (batch of one)."""
    length = int(row["prompt_length"])
    sequence_aligned = ("input_ids", *token_type_keys())
    inputs = {}
    for key, value in row.items():
        if key in ROW_METADATA:
            continue
        tensor = torch.as_tensor(value)
        if key in sequence_aligned:
            tensor = tensor.reshape(1, -1)[:, :length]
        inputs[key] = tensor.to(device)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return inputs


def measure_acceptance_length(target, drafter, dataset, num_samples: int, max_new_tokens: int) -> float:
    """Mean acceptance length of DREAM greedy decoding (`drafter.last_stats`) on the prompts of the first
    `num_samples` rows of `dataset`; NaN if none. The drafter runs in eval mode, then gets its training mode back."""
    was_training = drafter.training
    drafter.eval()
    lengths = []
    try:
        for index in range(min(num_samples, len(dataset))):
            inputs = prompt_inputs(dataset[index], target.device)
            with torch.no_grad():
                target.generate(**inputs, assistant_model=drafter, max_new_tokens=max_new_tokens, do_sample=False)
            lengths.append(drafter.last_stats["acceptance_length"])
    finally:
        drafter.train(was_training)
    return sum(lengths) / len(lengths) if lengths else math.nan
