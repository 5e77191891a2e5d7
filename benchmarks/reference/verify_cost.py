"""What verification and drafting cost on this machine, in decoding steps, and what that allows.

Times target passes over N = 1, 2, 4, 6, 8, 16 new tokens after a cached context (the same
measurement `tree_total_tokens="auto"` and `draft_schedule="auto"` make:
`hf_dream.generation.cost_model`) for each target dtype, and divides by the one-token pass. With
`--drafter`, also times one drafter forward over one token on a cached context (the cost of one
draft). With `--bench` (an `hf-dream bench` JSON with an `ar` run on the same machine), it bounds what
any drafter could reach on those prompts: the prompt's prefill (plain decoding's time minus its
decoding steps) is paid by every method, and the best a drafter that is always right can do is to
verify the whole rest of the answer in one pass. Writes JSON and a markdown table.

    python benchmarks/reference/verify_cost.py --target reference:smolvlm-ref --drafter model_cards/dream-smolvlm-ref \
        --bench benchmarks/reference/smolvlm-ref-v1/adaptive-T0.json --threads 1 --out benchmarks/reference/smolvlm-ref-v1/verify_cost.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import DynamicCache

import hf_dream  # noqa: F401
from hf_dream import DreamDraftModel
from hf_dream.evaluation.bench import machine_description
from hf_dream.generation.cost_model import interpolate_costs, measure_draft_step_cost, measure_verification_costs
from hf_dream.loading import load_target

SIZES = (1, 2, 4, 6, 8, 16)


def drafter_step_seconds(drafter: DreamDraftModel, context: int, repeats: int) -> float:
    """Median seconds of one drafter forward over one token after `context` cached positions (random
    features: the cost does not depend on them), timed as `tree_total_tokens="auto"` times it."""
    hidden = drafter.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    cache = DynamicCache()
    memory = drafter.new_memory(torch.randn(1, context, hidden, generator=generator).to(drafter.dtype))
    with torch.no_grad():
        embeds = torch.randn(1, context, hidden, generator=generator).to(drafter.dtype)
        drafter(embeds, torch.arange(context)[None], memory=memory, cache=cache)
    # the fields of a DrafterState that the library's timer reads (its cache is a RaggedCache around a DynamicCache)
    state = SimpleNamespace(drafter=drafter, lengths=torch.tensor([context]), memory=memory, cache=SimpleNamespace(cache=cache))
    return measure_draft_step_cost(state, repeats)


def perfect_drafter_bound(bench: dict, costs: dict[int, float], draft_seconds: float) -> dict:
    """Speedup a drafter that is always right could reach on the median answer of `bench`'s `ar` run."""
    runs = bench["runs"]["ar"]
    step = costs[1]
    lengths = [len(run["new_tokens"]) for run in runs]
    prefill = statistics.median(run["seconds"] - (len(run["new_tokens"]) - 1) * step for run in runs)
    length = int(statistics.median(lengths))
    plain = prefill + (length - 1) * step
    # after the prefill's token, draft the remaining length - 1 tokens and verify them (+ bonus) in one pass
    verify = interpolate_costs(costs, [length])[length]
    perfect = prefill + verify + (length - 1) * draft_seconds
    free_drafting = prefill + verify
    return {
        "median_new_tokens": length, "prefill_seconds": prefill, "plain_seconds": plain, "one_pass_seconds": verify,
        "bound": plain / perfect, "bound_with_free_drafting": plain / free_drafting,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="target spec, e.g. reference:smolvlm-ref")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma list of target dtypes")
    parser.add_argument("--drafter", help="drafter folder: also time one draft step (in each dtype)")
    parser.add_argument("--bench", help="`hf-dream bench` JSON with an `ar` run: bound what any drafter could reach there")
    parser.add_argument("--context", type=int, default=64, help="cached context length (rounded up to a power of 2)")
    parser.add_argument("--repeats", type=int, default=9, help="timed passes per size (median)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", required=True, help="result JSON; the .md table goes beside it")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    bench = json.loads(Path(args.bench).read_text()) if args.bench else None
    results, draft_steps, bounds = {}, {}, {}
    for name in args.dtypes.split(","):
        target, _ = load_target(args.target, dtype=getattr(torch, name))
        seconds = measure_verification_costs(target, args.context, sizes=SIZES, repeats=args.repeats)
        results[name] = {str(n): {"seconds": s, "steps": s / seconds[1]} for n, s in seconds.items()}
        if args.drafter:
            drafter = DreamDraftModel.from_pretrained(args.drafter).to(target.dtype).eval()
            drafter.attach_target(target)
            draft = drafter_step_seconds(drafter, args.context, args.repeats)
            draft_steps[name] = {"seconds": draft, "steps": draft / seconds[1]}
            if bench and name == bench["settings"]["target_dtype"].removeprefix("torch."):
                bounds[name] = perfect_drafter_bound(bench, seconds, draft)
        del target

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python " + shlex.join([str(Path(sys.argv[0])), *sys.argv[1:]])
    settings = {"target": args.target, "drafter": args.drafter, "bench": args.bench, "context": args.context, "repeats": args.repeats, "command": command, "machine": machine_description()}
    out.write_text(json.dumps({"settings": settings, "costs": results, "draft_step": draft_steps, "perfect_drafter": bounds}, indent=2) + "\n")
    lines = [
        f"# Verification and drafting cost of `{args.target}` (cached context of {args.context} tokens)",
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
    if draft_steps:
        cells = " | ".join(f"{draft_steps[name]['seconds'] * 1e3:.1f} | {draft_steps[name]['steps']:.2f}" for name in results)
        lines.append(f"| one draft step (`{args.drafter}`) | {cells} |")
    for name, bound in bounds.items():
        lines += [
            "",
            f"**What any drafter could reach** on the prompts of `{args.bench}` ({name}): the median answer has "
            f"{bound['median_new_tokens']} new tokens; plain decoding takes {bound['plain_seconds']:.3f} s of which "
            f"{bound['prefill_seconds']:.3f} s is the prefill every method pays. A drafter that is always right verifies the "
            f"rest in one pass ({bound['one_pass_seconds'] * 1e3:.0f} ms): at most **{bound['bound']:.2f}x** with this "
            f"drafter's step cost, {bound['bound_with_free_drafting']:.2f}x if drafting were free.",
        ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
