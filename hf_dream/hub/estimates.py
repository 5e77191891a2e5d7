"""Cost estimates of the paper's recipe for one target, by arithmetic (what a card quotes before training)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..configuration_dream import DreamConfig

# The DREAM paper's recipe (arXiv 2505.19201, section 4 of shared/reference/dream-method.md).
PAPER_RECIPE = {
    "steps": 68_000,
    "batch_size": 4,
    "gpus": 2,
    "gpu": "A100-80GB",
    "samples": 61_000,  # 55k LLaVA mix665k + 1k from each of 6 benchmarks
    "max_new_tokens": 1024,  # the reference code regenerates 500-1024 new tokens
    "learning_rate": 3e-5,
    "warmup_steps": 2000,  # reference code; the paper gives none
}


@dataclass(frozen=True)
class GPUSpec:
    """Public datasheet numbers of one accelerator, for the estimates on the cards."""

    name: str
    bf16_flops: float  # dense tensor-core peak
    memory_bandwidth: float  # bytes/s
    memory: float  # bytes


A100_80GB = GPUSpec("A100-80GB", bf16_flops=312e12, memory_bandwidth=2.039e12, memory=80e9)


def _gb(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.1f} GB" if num_bytes >= 1e9 else f"{num_bytes / 1e6:.0f} MB"


def training_estimate(
    config: DreamConfig,
    drafter_params: int,
    target_params: int,
    image_tokens: int,
    text_tokens: int = 400,
    recipe: dict = PAPER_RECIPE,
    gpu: GPUSpec = A100_80GB,
    mfu: float = 0.35,
    bandwidth_efficiency: float = 0.6,
    step_overhead_s: float = 0.025,
    decode_steps_per_batch: int = 512,
    train_step_overhead_s: float = 0.1,
) -> dict:
    """Time and memory of the paper's recipe for one target, by arithmetic (not measured).

    - Training FLOPs per token: target forward `2 N_t` + drafter forward and backward `6 N_d` +
      the target's lm_head inside the drafter's KL loss, forward and backward to its input `4 V H`;
      time = FLOPs / (GPUs x peak x `mfu`) + `train_step_overhead_s` per step (optimiser, data,
      launches: what dominates for small targets).
    - Regeneration (`prepare-data`, one GPU): each decoding step reads the target's bf16 weights
      once (`2 N_t / (bandwidth x efficiency)`) plus `step_overhead_s` of launch overhead; a batch
      runs `decode_steps_per_batch` steps (until its longest answer ends); prefill is compute-bound.
      The batch is the largest power of two whose KV cache fits beside the weights.
    """
    tokens = image_tokens + text_tokens
    vocab, hidden = config.vocab_size, config.hidden_size
    flops_per_token = 2 * target_params + 6 * drafter_params + 4 * vocab * hidden
    train_flops = flops_per_token * tokens * recipe["batch_size"] * recipe["steps"]
    train_s = train_flops / (recipe["gpus"] * gpu.bf16_flops * mfu) + recipe["steps"] * train_step_overhead_s

    target_bytes = 2 * target_params
    kv_per_token = 2 * config.target_num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    per_sequence = kv_per_token * (tokens + recipe["max_new_tokens"])
    batch = next((b for b in (32, 16, 8, 4, 2, 1) if target_bytes + b * per_sequence <= 0.85 * gpu.memory), 1)
    batches = math.ceil(recipe["samples"] / batch)
    step_s = target_bytes / (gpu.memory_bandwidth * bandwidth_efficiency) + step_overhead_s
    prefill_s = 2 * target_params * batch * tokens / (gpu.bf16_flops * mfu)
    prepare_s = batches * (decode_steps_per_batch * step_s + prefill_s)

    drafter_train_bytes = 16 * drafter_params  # fp32 weights + grads + AdamW m and v
    return {
        "gpu": gpu.name,
        "gpus": recipe["gpus"],
        "tokens_per_sample": tokens,
        "prepare_batch_size": batch,
        "prepare_hours": f"{prepare_s / 3600:.0f}" if prepare_s >= 3600 * 10 else f"{prepare_s / 3600:.1f}",
        "train_hours": f"{train_s / 3600:.0f}" if train_s >= 3600 * 10 else f"{train_s / 3600:.1f}",
        "prepare_how": (
            f"{recipe['samples']:,} prompts, batch {batch}, {decode_steps_per_batch} decoding steps per batch at "
            f"~{step_s * 1000:.0f} ms (bf16 weights read at {bandwidth_efficiency:.0%} of "
            f"{gpu.memory_bandwidth / 1e12:.1f} TB/s + {step_overhead_s * 1000:.0f} ms overhead) + prefill"
        ),
        "train_how": (
            f"{recipe['steps']:,} steps x batch {recipe['batch_size']} x ~{tokens:,} tokens/sample "
            f"({image_tokens:,} image + ~{text_tokens} text); {flops_per_token / 1e9:.1f} GFLOP/token "
            f"(2 N_target + 6 N_drafter + 4 V H) at {mfu:.0%} of {gpu.bf16_flops / 1e12:.0f} TFLOP/s bf16 per GPU, "
            f"+ {train_step_overhead_s * 1000:.0f} ms per step"
        ),
        "memory": [
            ("target weights, bf16 (2 B x N_target)", _gb(target_bytes)),
            ("drafter weights at inference, bf16 (2 B x N_drafter): the extra memory of speculative decoding", _gb(2 * drafter_params)),
            ("drafter training state, fp32 weights + grads + AdamW m, v (16 B x N_drafter)", _gb(drafter_train_bytes)),
            (
                f"training, per GPU (DDP: every GPU holds the bf16 target and the drafter state), of {_gb(gpu.memory)}",
                _gb(target_bytes + drafter_train_bytes),
            ),
            (
                f"prepare-data KV cache, batch {batch} x {tokens + recipe['max_new_tokens']:,} tokens "
                f"({kv_per_token / 1e6:.2f} MB/token: 2 x {config.target_num_hidden_layers} layers x "
                f"{config.num_key_value_heads} KV heads x {config.head_dim} x 2 B)",
                _gb(batch * per_sequence),
            ),
        ],
    }


def planned_recipe(
    target: str, drafter_name: str, prepare_batch_size: int = 8, recipe: dict = PAPER_RECIPE
) -> dict:
    """The commands and `train.yaml` of the paper's recipe for `target`, with hf-dream's options.

    `per_device_train_batch_size` x GPUs gives the paper's batch; the loss weights and optimiser
    settings are `DreamTrainingArguments`' defaults written out, so the file states the recipe.
    """
    per_device = recipe["batch_size"] // recipe["gpus"]
    data_dir = f"data/{drafter_name}"
    train_yaml = "\n".join(
        [
            f"# DREAM recipe for {target}: `torchrun --nproc_per_node {recipe['gpus']} -m hf_dream train --config train.yaml`",
            f"# (paper: {recipe['steps']} iterations, batch {recipe['batch_size']}, {recipe['gpus']}x {recipe['gpu']}).",
            f"target: {target}",
            f"dataset: {data_dir}                # output of `hf-dream prepare-data`",
            "eval_size: 512                     # rows held out for evaluation (never trained on)",
            "target_dtype: bfloat16",
            "fusion: cross_attention",
            "visual_keep_ratio: 0.75",
            "num_draft_tokens: 5",
            f"output_dir: runs/{drafter_name}",
            f"save_drafter_to: runs/{drafter_name}/drafter",
            f"max_steps: {recipe['steps']}",
            f"per_device_train_batch_size: {per_device}     # x {recipe['gpus']} GPUs = batch {recipe['batch_size']}",
            "gradient_accumulation_steps: 1",
            f"learning_rate: {recipe['learning_rate']:.1e}              # written with a '.' so that YAML reads a float",
            "adam_beta1: 0.9",
            "adam_beta2: 0.95",
            "max_grad_norm: 0.5",
            f"warmup_steps: {recipe['warmup_steps']}                 # reference code; the paper states none",
            "lr_scheduler_type: constant_with_warmup",
            "bf16: true",
            "w_final: 0.2",
            "w_mid: 0.2",
            "w_kl: 1.0",
            "mid_supervision: entropy",
            "feature_noise: 0.2                 # reference code (EAGLE's trick); not in the paper",
            "eval_strategy: steps",
            "eval_steps: 4000",
            "save_steps: 4000",
            "save_total_limit: 3",
            "logging_steps: 50",
            "dataloader_num_workers: 2",
            "report_to: none",
        ]
    )
    prepare = (
        f"hf-dream prepare-data --target {target} --prompts data/dream-mix.jsonl --output {data_dir} "
        f"--max-new-tokens {recipe['max_new_tokens']} --batch-size {prepare_batch_size} --target-dtype bfloat16"
    )
    return {
        **{key: recipe[key] for key in ("steps", "batch_size", "gpus", "gpu")},
        "samples": f"{recipe['samples']:,}",
        "prompts_file": "data/dream-mix.jsonl",
        "prepare_command": prepare,
        "train_command": f"torchrun --nproc_per_node {recipe['gpus']} -m hf_dream train --config train.yaml",
        "train_yaml": train_yaml + "\n",
    }
