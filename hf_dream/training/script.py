"""The training job behind `hf-dream train`, usable as is under `torchrun` / `accelerate launch`:

    torchrun --nproc_per_node 2 -m hf_dream train --config train.yaml
    accelerate launch -m hf_dream train --config train.yaml
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from datasets import load_from_disk

from ..modeling_dream import DreamDraftModel
from .trainer import DreamTrainer, DreamTrainingArguments
from .vocab import most_frequent_tokens


@dataclass
class DreamScriptArguments:
    """What to train: the target, the prepared data and the drafter."""

    target: str | None = field(
        default=None,
        metadata={"help": "Target spec: a folder or Hub id, 'reference:<name>' or 'tiny:<family>' (required)."},
    )
    dataset: str | None = field(
        default=None, metadata={"help": "Prepared dataset: the output folder of `hf-dream prepare-data` (required)."}
    )
    eval_dataset: str | None = field(default=None, metadata={"help": "Prepared dataset for evaluation (optional)."})
    eval_size: int = field(
        default=0, metadata={"help": "Without --eval_dataset: hold out this many rows of --dataset for evaluation."}
    )
    drafter: str | None = field(
        default=None, metadata={"help": "Start from this saved drafter (folder or Hub id) instead of a fresh one."}
    )
    fusion: str = field(default="cross_attention", metadata={"help": "Fresh drafter: 'cross_attention' (DREAM), 'concat' (EAGLE-style) or 'cross_attention_concat' (DREAM's blocks with EAGLE's input)."})
    cross_attention_rope: bool = field(
        default=False,
        metadata={"help": "Fresh cross-attention drafter: a rotary embedding by memory slot on its cross-attention (scores "
                  "depend on the offset to each feature; DREAM's code uses none)."},
    )
    visual_keep_ratio: float = field(default=0.75, metadata={"help": "Fresh drafter: fraction of visual tokens it sees."})
    num_draft_tokens: int = field(default=5, metadata={"help": "Fresh drafter: tokens drafted per round in its default decoding options while this run uses it (not saved with the drafter: pass `num_draft_tokens=` per generate() call)."})
    draft_vocab_size: int | None = field(
        default=None,
        metadata={"help": "Fresh drafter: draft only the N most frequent response tokens of --dataset (EAGLE-3 style); 0 or unset: the full vocabulary."},
    )
    entropy_layers: str | None = field(
        default=None,
        metadata={"help": "Fresh drafter: target layers among which entropy-adaptive supervision chooses: 'all' (every layer "
                  "1..L-1, as the paper describes) or a comma list; default 1..int(0.4L)-2 (the reference code's range)."},
    )
    feature_layers: str | None = field(
        default=None,
        metadata={"help": "Fresh drafter: the target hidden states it reads, fused by a linear layer: 'eagle3' (EAGLE-3's "
                  "low/middle/high layers 2, L/2, L-3; with --fusion concat and --ttt_steps, the EAGLE-3 baseline) or a "
                  "comma list of hidden-state indices (0 = embeddings, L = last layer); default: the last layer alone."},
    )
    intermediate_size: int | None = field(
        default=None,
        metadata={"help": "Fresh drafter: MLP width of its blocks (default: the target's). Smaller keeps the drafter's file small."},
    )
    early_stopping_patience: int = field(
        default=0,
        metadata={"help": "Stop when the held-out loss has not improved for N evaluations in a row and keep the best "
                  "checkpoint's weights (transformers' EarlyStoppingCallback with load_best_model_at_end): the number of "
                  "steps is read off the curve, --max_steps is only a ceiling. Needs evaluation and saving at the same "
                  "steps. 0 (default): off."},
    )
    target_dtype: str | None = field(default=None, metadata={"help": "Load the target in this dtype (e.g. bfloat16)."})
    save_drafter_to: str | None = field(
        default=None, metadata={"help": "Where to save the trained drafter (default: <output_dir>/drafter)."}
    )


def _entropy_layers(spec: str | None, target) -> dict:
    """`entropy_candidate_layers` override from `--entropy_layers` ('all' or '3,7,12'); {} for the default."""
    if not spec:
        return {}
    from ..targets import get_target_adapter

    num_layers = get_target_adapter(target).num_hidden_layers
    layers = list(range(1, num_layers)) if spec == "all" else [int(x) for x in spec.split(",") if x.strip()]
    bad = [layer for layer in layers if not 0 < layer < num_layers]
    if not layers or bad:
        raise ValueError(f"--entropy_layers must be 'all' or target layers in 1..{num_layers - 1}, got {spec!r}")
    return {"entropy_candidate_layers": layers}


def _feature_layers(spec: str | None) -> dict:
    """`--feature_layers` as a `from_target` override: none, "eagle3" (resolved there), or a list of indices."""
    if spec is None:
        return {}
    if spec == "eagle3":
        return {"feature_layers": "eagle3"}
    try:
        return {"feature_layers": [int(part) for part in spec.split(",")]}
    except ValueError:
        raise ValueError(f"--feature_layers must be 'eagle3' or a comma list of layer indices, got {spec!r}") from None


def load_prepared(path: str | Path):
    """A prepared dataset from `path` or `path/dataset` (the layout `prepare-data` writes)."""
    path = Path(path)
    if (path / "dataset").is_dir():
        path = path / "dataset"
    if not path.is_dir():
        raise FileNotFoundError(f"No prepared dataset at {path}: run `hf-dream prepare-data` first.")
    return load_from_disk(str(path))


def check_prepared_for(path: str | Path, target, target_spec: str, option: str = "--dataset") -> None:
    """Refuse a prepared dataset that `prepare-data` made with another target (its rows would not fit this one:
    other image inputs, other token ids). Folders without a record (older hf-dream) are not checked."""
    from .data import recorded_settings, target_identity

    recorded = (recorded_settings(path) or {}).get("target")
    if not recorded:
        return
    now = target_identity(target)
    compared = ["model_type", "build", "num_hidden_layers", "vocab_size"]
    if recorded.get("dtype") == now["dtype"]:  # the fingerprint samples the weights as loaded: in another dtype they differ
        compared.append("weights_fingerprint")
    compared = [key for key in compared if key in recorded]
    differences = [f"{key} {recorded[key]!r} -> {now.get(key)!r}" for key in compared if recorded[key] != now.get(key)]
    if differences:
        made_with = recorded_settings(path).get("target_spec") or "another target"
        raise ValueError(
            f"{option} {path} was prepared with {made_with}, not with --target {target_spec} ({', '.join(differences)}): "
            f"its responses are another model's. Prepare data with this target: "
            f"`hf-dream prepare-data --target {target_spec} ...`, or train with --target {made_with}."
        )


def run_training(script_args: DreamScriptArguments, training_args: DreamTrainingArguments) -> DreamDraftModel:
    """Load the target and data, build or load the drafter, train, save. Returns the drafter."""
    from ..loading import load_target, resolve_target_spec
    from ..modeling_dream import check_drafter_source

    if not script_args.target or not script_args.dataset:
        raise ValueError("Both --target and --dataset are required (on the command line or in --config).")
    # everything that can be checked without the target first: loading a large target takes minutes
    resolve_target_spec(script_args.target)
    _feature_layers(script_args.feature_layers)
    train_dataset = load_prepared(script_args.dataset)
    eval_dataset = load_prepared(script_args.eval_dataset) if script_args.eval_dataset else None
    if script_args.drafter:
        check_drafter_source(script_args.drafter)
    callbacks = _early_stopping(script_args, training_args, has_eval=eval_dataset is not None or script_args.eval_size > 0)
    target, _ = load_target(script_args.target, dtype=script_args.target_dtype)
    for option, path in (("--dataset", script_args.dataset), ("--eval_dataset", script_args.eval_dataset)):
        if path:
            check_prepared_for(path, target, script_args.target, option)
    if eval_dataset is None and script_args.eval_size > 0:
        if script_args.eval_size >= len(train_dataset):
            raise ValueError(f"--eval_size {script_args.eval_size} leaves no training rows ({len(train_dataset)} in all).")
        split = len(train_dataset) - script_args.eval_size
        train_dataset, eval_dataset = train_dataset.select(range(split)), train_dataset.select(range(split, len(train_dataset)))
    if script_args.drafter:
        drafter = DreamDraftModel.from_pretrained(script_args.drafter).to(target.device)
    else:
        drafter = DreamDraftModel.from_target(
            target,
            fusion=script_args.fusion,
            cross_attention_rope=script_args.cross_attention_rope,
            visual_keep_ratio=script_args.visual_keep_ratio,
            num_draft_tokens=script_args.num_draft_tokens,
            draft_vocab_size=script_args.draft_vocab_size or None,  # 0 overrides a config file's value: full vocabulary
            **({"intermediate_size": script_args.intermediate_size} if script_args.intermediate_size else {}),
            **_entropy_layers(script_args.entropy_layers, target),
            **_feature_layers(script_args.feature_layers),
            target_name_or_path=script_args.target,
        )
        if script_args.draft_vocab_size:
            eos = target.generation_config.eos_token_id
            eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
            drafter.set_draft_vocab(most_frequent_tokens(train_dataset, script_args.draft_vocab_size, always=eos))
    drafter = drafter.float()  # master weights in fp32; use --bf16 for mixed precision
    trainer = DreamTrainer(
        model=drafter, teacher=target, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset, callbacks=callbacks
    )
    if trainer.is_world_process_zero():
        trainable = sum(p.numel() for p in drafter.parameters() if p.requires_grad)
        print(f"[hf-dream] training {trainable:,} drafter parameters on {training_args.world_size} process(es)")
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    evaluated = {entry["step"] for entry in trainer.state.log_history if "eval_loss" in entry}
    if eval_dataset is not None and trainer.state.global_step not in evaluated:  # the final weights' held-out numbers
        trainer.evaluate()
    destination = script_args.save_drafter_to or str(Path(training_args.output_dir) / "drafter")
    trainer.save_model(destination)
    if trainer.is_world_process_zero():
        # Trainer.save_model also pickles the TrainingArguments there; a drafter folder holds only what is
        # uploaded (hf-dream push refuses pickles); the run's checkpoints keep their own copy
        (Path(destination) / "training_args.bin").unlink(missing_ok=True)
    return drafter


def _early_stopping(script_args: DreamScriptArguments, training_args: DreamTrainingArguments, has_eval: bool) -> list:
    """The callbacks of `--early_stopping_patience` (none when 0), checked before anything is loaded; sets the
    arguments it needs (best checkpoint kept and loaded at the end, by held-out loss unless another metric is set)."""
    patience = script_args.early_stopping_patience
    if patience <= 0:
        return []
    from transformers import EarlyStoppingCallback

    if not has_eval:
        raise ValueError("--early_stopping_patience needs held-out rows: pass --eval_size N or --eval_dataset.")
    if training_args.eval_strategy != training_args.save_strategy or (
        training_args.eval_strategy == "steps" and training_args.save_steps % training_args.eval_steps
    ):
        raise ValueError(
            "--early_stopping_patience keeps the best checkpoint, so saving must follow evaluation: set --save_strategy "
            f"to --eval_strategy ({training_args.eval_strategy}) and --save_steps to a multiple of --eval_steps "
            f"(got {training_args.save_strategy}, save_steps {training_args.save_steps}, eval_steps {training_args.eval_steps})."
        )
    training_args.load_best_model_at_end = True
    training_args.metric_for_best_model = training_args.metric_for_best_model or "eval_loss"
    if training_args.greater_is_better is None:
        training_args.greater_is_better = training_args.metric_for_best_model.endswith(("agreement", "acceptance_length"))
    return [EarlyStoppingCallback(early_stopping_patience=patience)]


def leave_process_group() -> None:
    """End a launched (torchrun / accelerate) run cleanly; a no-op without torch.distributed.

    Gloo's worker threads must be joined while the interpreter is still alive: left to interpreter shutdown,
    the last references to the process group (held by the DDP wrapper) can abort a rank with "terminate
    called without an active exception" after its work is saved, and the launcher then reports a failure.
    """
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    gc.collect()  # drop the DDP wrapper (and its reference to the group) before the group goes
    dist.destroy_process_group()
