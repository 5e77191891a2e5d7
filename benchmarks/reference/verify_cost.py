"""What a verification pass costs on this machine, in decoding steps, per target dtype.

Times target passes over N = 1, 2, 4, 6, 8, 16 new tokens after a cached context (the same
measurement `tree_total_tokens="auto"` makes: `hf_dream.generation.tree_size`) for each dtype and
divides by the one-token pass. A chain of k drafts needs tau > cost(k + 1) / cost(1) (plus the
drafter's steps) before it is faster than plain decoding. Writes JSON and a markdown table.

    python benchmarks/reference/verify_cost.py --target reference:smolvlm-ref --threads 1 --out benchmarks/reference/smolvlm-ref/verify_cost.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

import hf_dream  # noqa: F401
from hf_dream.evaluation.bench import machine_description
from hf_dream.generation.tree_size import measure_verification_costs
from hf_dream.loading import load_target

SIZES = (1, 2, 4, 6, 8, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="target spec, e.g. reference:smolvlm-ref")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma list of target dtypes")
    parser.add_argument("--context", type=int, default=64, help="cached context length (rounded up to a power of 2)")
    parser.add_argument("--repeats", type=int, default=9, help="timed passes per size (median)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", required=True, help="result JSON; the .md table goes beside it")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {}
    for name in args.dtypes.split(","):
        target, _ = load_target(args.target, dtype=getattr(torch, name))
        seconds = measure_verification_costs(target, args.context, sizes=SIZES, repeats=args.repeats)
        results[name] = {str(n): {"seconds": s, "steps": s / seconds[1]} for n, s in seconds.items()}
        del target

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python " + shlex.join([str(Path(sys.argv[0])), *sys.argv[1:]])
    settings = {"target": args.target, "context": args.context, "repeats": args.repeats, "command": command, "machine": machine_description()}
    out.write_text(json.dumps({"settings": settings, "costs": results}, indent=2) + "\n")
    lines = [
        f"# Verification cost of `{args.target}` (cached context of {args.context} tokens)",
        "",
        f"- Command: `{command}`",
        "- Machine: " + ", ".join(f"{key} {value}" for key, value in settings["machine"].items()),
        "",
        "| new tokens in the pass | " + " | ".join(f"{name}: ms | {name}: decoding steps" for name in results) + " |",
        "|---:|" + "---:|---:|" * len(results),
    ]
    for n in SIZES:
        cells = " | ".join(f"{results[name][str(n)]['seconds'] * 1e3:.1f} | {results[name][str(n)]['steps']:.2f}" for name in results)
        lines.append(f"| {n} | {cells} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
