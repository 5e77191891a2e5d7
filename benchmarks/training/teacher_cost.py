"""Teacher live vs stored: the seconds of one DreamTrainer step with the target run every step and with its
signals read from a `TeacherCache`, and what filling the cache costs per row.

Runs the real `DreamTrainer.compute_loss` + backward + AdamW step on the first batches its own train dataloader
gives (the recipe's sampler, e.g. length-grouped), in both modes on the same batches, interleaved, for each
`--ttt-steps`; the cache is filled for exactly those rows first (timed). Writes JSON and a markdown table.

    python benchmarks/training/teacher_cost.py --config benchmarks/reference/smolvlm-ref/train-4000.yaml \\
        --dataset DATA --threads 1 --batches 6 --ttt-steps 1 3
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

import hf_dream  # noqa: F401
from hf_dream import DreamDraftModel
from hf_dream.evaluation.bench import machine_description
from hf_dream.loading import load_target
from hf_dream.training import DreamTrainer, DreamTrainingArguments
from hf_dream.training.script import load_prepared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", required=True, help="an `hf-dream train --config` recipe (target, drafter and training settings)"
    )
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--ttt-steps", type=int, nargs="+", default=[1])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", default=str(Path(__file__).with_name("teacher_cost.json")))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = yaml.safe_load(Path(args.config).read_text())
    target, _ = load_target(recipe["target"])
    dataset = load_prepared(args.dataset)
    fields = set(DreamTrainingArguments.__dataclass_fields__)
    training = {
        k: v
        for k, v in recipe.items()
        if k in fields
        and k not in ("output_dir", "teacher_cache_dir", "ttt_steps", "disable_tqdm", "eval_strategy", "save_strategy")
    }
    drafter_options = {
        k: recipe[k] for k in ("draft_vocab_size", "visual_keep_ratio", "num_draft_tokens", "fusion") if k in recipe
    }
    work = Path(tempfile.mkdtemp(prefix="teacher-cost-"))
    rows = []
    for ttt in args.ttt_steps:
        trainers = {}
        for mode in ("live", "stored"):
            torch.manual_seed(0)
            drafter = DreamDraftModel.from_target(target, **drafter_options).float().train()
            training_args = DreamTrainingArguments(
                output_dir=str(work / "out"),
                ttt_steps=ttt,
                disable_tqdm=True,
                eval_strategy="no",
                save_strategy="no",
                teacher_cache_dir=str(work / f"cache-{ttt}") if mode == "stored" else None,  # filled afresh: timed
                **training,
            )
            subset = dataset.select(range(args.batches * training_args.per_device_train_batch_size * 4))
            start = time.perf_counter()
            trainers[mode] = DreamTrainer(model=drafter, teacher=target, args=training_args, train_dataset=subset)
            if mode == "stored":
                fill_seconds_per_row = (time.perf_counter() - start) / len(subset)
        # the same batches for both (the live teacher ignores `row_key`), interleaved
        batches = [batch for _, batch in zip(range(args.batches), trainers["stored"].get_train_dataloader())]
        seconds = {"live": [], "stored": []}
        for batch in batches:
            for mode, trainer in trainers.items():
                optimizer = trainer.create_optimizer()
                start = time.perf_counter()
                with trainer.autocast_smart_context_manager():
                    loss = trainer.compute_loss(trainer.model, batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                seconds[mode].append(time.perf_counter() - start)
        for mode, values in seconds.items():
            rows.append({"mode": mode, "ttt_steps": ttt, "step_seconds": statistics.median(values)})
        rows[-1]["fill_seconds_per_row"] = fill_seconds_per_row
        rows[-1]["batch_shapes"] = [list(batch["input_ids"].shape) for batch in batches]
    result = {
        "command": "python " + shlex.join(sys.argv),
        "recipe": recipe,
        "machine": machine_description(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| ttt steps | live step s | stored step s | speedup | cache fill s/row |", "|---:|---:|---:|---:|---:|"]
    for live, stored in zip(rows[::2], rows[1::2]):
        lines.append(
            f"| {live['ttt_steps']} | {live['step_seconds']:.2f} | {stored['step_seconds']:.2f} | "
            f"{live['step_seconds'] / stored['step_seconds']:.2f}x | {stored['fill_seconds_per_row']:.2f} |"
        )
    shapes = rows[1]["batch_shapes"]
    out.with_suffix(".md").write_text(
        f"`{result['command']}` ({result['date']}, {result['threads']} thread(s), batches {shapes})\n\n" + "\n".join(lines) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
