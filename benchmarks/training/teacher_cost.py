"""Teacher on the fly vs cached: what one DreamTrainer step spends in the teacher and in the drafter.

Measures, on a prepared dataset, the median seconds of (a) the teacher pass that yields every
training signal (`read_teacher`: features, logits, entropy-selected states, visual ranking) and
(b) the drafter's forward + backward + AdamW step, in fp32 and bf16 autocast, with the full and a
reduced (8k) draft vocabulary. Writes JSON and a markdown table next to this script.

    python benchmarks/training/teacher_cost.py --target reference:smolvlm-ref --dataset DATA [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import hf_dream  # noqa: F401
from hf_dream import DreamDraftModel
from hf_dream.evaluation.bench import machine_description
from hf_dream.features import read_teacher
from hf_dream.loading import load_target
from hf_dream.training.data import DreamDataCollator, response_mask
from hf_dream.training.losses import dream_losses
from hf_dream.training.script import load_prepared
from hf_dream.training.trainer import _gather, gather_positions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", default=str(Path(__file__).with_name("teacher_cost.json")))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    target, _ = load_target(args.target)
    dataset = load_prepared(args.dataset)
    batch = DreamDataCollator(target.generation_config.pad_token_id or 0)([dataset[i] for i in range(args.batch_size)])
    rows = []
    for vocab in (None, 8192):
        drafter = DreamDraftModel.from_target(target, draft_vocab_size=vocab).float().train()
        optimizer = torch.optim.AdamW(drafter.parameters(), lr=1e-5)
        for bf16 in (False, True):
            teacher_s, drafter_s = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    teacher = read_teacher(drafter.target_adapter, batch, drafter.config.entropy_candidate_layers, keep_ratio=0.75)
                middle = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    positions, slots = gather_positions(teacher.keep, batch["attention_mask"])
                    out = drafter(_gather(teacher.input_embeds, positions), positions, target_features=teacher.features, attention_mask=slots.long())
                    logits = _gather(teacher.logits, positions)
                    logits = logits if vocab is None else logits[..., drafter.draft_vocab]
                    mask = slots & torch.gather(response_mask(batch), 1, positions)
                    losses = dream_losses(out, logits, _gather(teacher.features, positions), _gather(teacher.mid_features, positions), mask)
                    loss = losses["kl"] + 0.2 * losses["final"] + 0.2 * losses["mid"]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                teacher_s.append(middle - start)
                drafter_s.append(time.perf_counter() - middle)
            rows.append({
                "draft_vocab_size": vocab or drafter.config.vocab_size, "bf16_autocast": bf16,
                "teacher_seconds": statistics.median(teacher_s), "drafter_step_seconds": statistics.median(drafter_s),
            })
    result = {
        "command": "python " + shlex.join(sys.argv), "target": args.target, "batch_shape": list(batch["input_ids"].shape),
        "machine": machine_description(), "date": time.strftime("%Y-%m-%d"), "rows": rows,
    }
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2))
    lines = ["| draft vocab | bf16 | teacher s | drafter step s | teacher share |", "|---:|:---:|---:|---:|---:|"]
    for row in rows:
        share = row["teacher_seconds"] / (row["teacher_seconds"] + row["drafter_step_seconds"])
        lines.append(f"| {row['draft_vocab_size']} | {row['bf16_autocast']} | {row['teacher_seconds']:.3f} | {row['drafter_step_seconds']:.3f} | {share:.0%} |")
    out.with_suffix(".md").write_text(f"`{result['command']}` ({result['date']}, batch {result['batch_shape']})\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
