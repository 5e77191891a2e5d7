"""`hf-dream`: one command line for the project's jobs.

Every subcommand lives in its own function and registers itself in `COMMANDS`; `--help` on any of
them documents every option.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register `run(args) -> exit code` as subcommand `name`, with `configure(parser)` adding its options."""

    def register(run):
        COMMANDS[name] = (configure, run)
        return run

    return register


# --- demo ----------------------------------------------------------------------------------
def _configure_demo(parser: argparse.ArgumentParser) -> None:
    from .testing import SUPPORTED_TINY_FAMILIES

    parser.add_argument("--family", default="llava", choices=SUPPORTED_TINY_FAMILIES, help="tiny target family (default: llava)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate (default: 48)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny target and its prompt (default: 0)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


@command("demo", _configure_demo)
def run_demo(args: argparse.Namespace) -> int:
    """Generate on a tiny offline target with and without a DREAM drafter and compare."""
    import torch

    from . import DreamDraftModel
    from .testing import build_tiny_target, make_tiny_inputs

    torch.set_num_threads(1)  # tiny models: thread overhead dominates
    target = build_tiny_target(args.family, seed=args.seed)
    inputs = make_tiny_inputs(target, seed=args.seed)
    drafter = DreamDraftModel.from_target(target)
    prompt_length = inputs["input_ids"].shape[1]

    start = time.perf_counter()
    plain = target.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    plain_s = time.perf_counter() - start
    start = time.perf_counter()
    dream = target.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, assistant_model=drafter)
    dream_s = time.perf_counter() - start
    identical = torch.equal(plain, dream)
    stats = {k: v for k, v in drafter.last_stats.items() if not isinstance(v, list)}
    result = {
        "target": f"tiny random {args.family} ({sum(p.numel() for p in target.parameters()):,} parameters)",
        "drafter": "untrained DREAM drafter (DreamDraftModel.from_target)",
        "plain_tokens": plain[0, prompt_length:].tolist(),
        "dream_tokens": dream[0, prompt_length:].tolist(),
        "identical": identical,
        "stats": stats,
        "seconds": {"plain": round(plain_s, 3), "dream": round(dream_s, 3)},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"target : {result['target']}\ndrafter: {result['drafter']}")
        print(f"plain generate : {result['plain_tokens']}")
        print(f"with drafter   : {result['dream_tokens']}")
        print(f"identical      : {identical}")
        print("stats          : " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
        print("(an untrained drafter is rarely right: the output is still exactly the target's)")
    return 0 if identical else 1


# --- entry point -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-dream",
        description="DREAM speculative decoding for vision-language models in transformers.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (configure, run) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=(run.__doc__ or "").strip().splitlines()[0], description=run.__doc__)
        configure(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
