"""`hf-dream bench`: every decoding method on the same target and prompts, interleaved.

Machines are noisy, so methods run interleaved per prompt (in a rotating order) and speedups are
the median of per-prompt ratios measured side by side; a single absolute time is never the result.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..modeling_dream import DreamDraftModel


@dataclass
class Method:
    """One way of decoding: `ar` (plain), `prompt_lookup`, or a drafter (chain or tree)."""

    name: str
    kind: str  # "ar" | "prompt_lookup" | "chain" | "tree"
    drafter: DreamDraftModel | None = None
    options: dict = field(default_factory=dict)  # extra generate() keywords: DREAM decoding options for chain / tree

    def generate_kwargs(self) -> dict:
        """Extra `generate()` keyword arguments that select this method (empty for `ar`)."""
        if self.kind == "prompt_lookup":
            return {"prompt_lookup_num_tokens": self.options.get("prompt_lookup_num_tokens", 10)}
        if self.kind == "chain":
            return {"assistant_model": self.drafter, **self.options}
        if self.kind == "tree":
            from ..generation.tree import tree_generate

            return {"custom_generate": tree_generate, "drafter": self.drafter, **self.options}
        return {}


def build_methods(
    names: list[str], drafters: dict[str, DreamDraftModel], tree_options: dict | None = None, chain_options: dict | None = None,
    drafter_options: dict | None = None,
) -> list[Method]:
    """Resolve method names: `ar`, `prompt_lookup`, a drafter name (chain) or `<drafter>_tree`. DREAM decoding
    options passed to generate() (see `DreamDecodingOptions`): `tree_options` for every tree method,
    `chain_options` (`{drafter name: options}`) for a drafter's chain, `drafter_options` (same keys) for its chain
    and tree alike."""
    methods, chain_options, drafter_options = [], chain_options or {}, drafter_options or {}
    for name in names:
        if name in ("ar", "prompt_lookup"):
            methods.append(Method(name, name))
        elif name in drafters:
            methods.append(Method(name, "chain", drafters[name], {**chain_options.get(name, {}), **drafter_options.get(name, {})}))
        elif name.endswith("_tree") and name[: -len("_tree")] in drafters:
            base = name[: -len("_tree")]
            methods.append(Method(name, "tree", drafters[base], {**(tree_options or {}), **drafter_options.get(base, {})}))
        else:
            known = ["ar", "prompt_lookup", *drafters, *(f"{d}_tree" for d in drafters)]
            raise ValueError(f"Unknown method {name!r}; available with these drafters: {', '.join(known)}")
    if "ar" not in [m.name for m in methods]:
        methods.insert(0, Method("ar", "ar"))  # every speedup is relative to plain decoding
    return methods


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def run_one(target, method: Method, inputs: dict, max_new_tokens: int, temperature: float, seed: int) -> dict:
    """One timed generate call (prefill included)."""
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
    on_cuda = target.device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        output = target.generate(**inputs, max_new_tokens=max_new_tokens, **sampling, **method.generate_kwargs())
    if on_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    new_tokens = sequences[0, inputs["input_ids"].shape[1] :].tolist()
    stats = dict(method.drafter.last_stats) if method.drafter is not None and method.drafter.last_stats else {}
    return {
        "seconds": seconds,
        "new_tokens": new_tokens,
        "target_passes": stats.get("target_passes", len(new_tokens) if method.kind == "ar" else None),
        # per drafting round (the prefill drafts nothing): drafts proposed (chain: its length; tree: its nodes) and
        # accepted (the accepted path's length), for `position_acceptance`
        "drafted_per_pass": stats.get("drafted_per_pass"),
        "accepted_per_pass": stats.get("accepted_per_pass"),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if on_cuda else _peak_rss_bytes(),
    }


def benchmark(target, encoded_prompts: list[dict], methods: list[Method], max_new_tokens: int, temperature: float = 0.0, warmup: bool = True, show_progress: bool = True) -> dict:
    """Run every method on every prompt, interleaved; returns per-prompt runs and a summary."""
    methods, errors = list(methods), {}
    for method in list(methods):
        # The warm-up call (first calls pay one-off costs) also finds methods that cannot run on
        # this target, e.g. stock prompt lookup on Gemma3's out-of-vocabulary image ids.
        if not warmup and method.kind != "prompt_lookup":
            continue
        try:
            run_one(target, method, encoded_prompts[0], min(8, max_new_tokens), temperature, seed=0)
        except Exception as error:  # noqa: BLE001 - reported in the results, not hidden
            if method.name == "ar":
                raise
            errors[method.name] = f"{type(error).__name__}: {error}"
            methods.remove(method)
    runs: dict[str, list[dict]] = {m.name: [] for m in methods}
    for index, inputs in enumerate(tqdm(encoded_prompts, desc="benchmarking", disable=not show_progress)):
        shift = index % len(methods)
        for method in methods[shift:] + methods[:shift]:  # rotate the order: no method always runs first
            if method.name in errors:
                continue
            try:
                runs[method.name].append(run_one(target, method, inputs, max_new_tokens, temperature, seed=index))
            except Exception as error:  # noqa: BLE001 - a failure later in the run: reported, the method dropped
                if method.name == "ar":
                    raise
                errors[method.name] = f"prompt {index}: {type(error).__name__}: {error}"
    # a method that failed on some prompt is left out of the comparison (its runs cover other prompts)
    methods = [m for m in methods if m.name not in errors]
    runs = {name: r for name, r in runs.items() if name not in errors}
    return {
        "runs": runs,
        "summary": summarize(runs, methods, temperature),
        "model_bytes": _memory_overheads(target, methods),
        "method_errors": errors,
    }


def _memory_overheads(target, methods: list[Method]) -> dict:
    target_bytes = _model_bytes(target)
    result = {"target": target_bytes}
    for method in methods:
        if method.drafter is not None:
            drafter_bytes = _model_bytes(method.drafter)
            result[method.name] = {"drafter": drafter_bytes, "overhead_vs_target": drafter_bytes / target_bytes}
    return result


def _throughput(run: dict) -> float:
    """New tokens per second of one run (at least one token: an immediate EOS still costs a pass)."""
    return max(1, len(run["new_tokens"])) / run["seconds"]


def summarize(runs: dict[str, list[dict]], methods: list[Method], temperature: float) -> dict:
    """Per-method totals, acceptance length, median/min/max speedup over `ar` and peak memory.

    Speedups are per-prompt ratios of tokens per second to the `ar` run of the same prompt: at
    temperature 0 the outputs have the same length, so this is the ratio of times; when sampling,
    the lengths differ and a ratio of times would compare different amounts of work. At temperature
    0 each method's tokens are also compared with `ar` (`identical_to_ar`, `mismatched_prompts`).
    """
    baseline = runs["ar"]
    summary = {}
    for method in methods:
        method_runs = runs[method.name]
        new_tokens = sum(len(run["new_tokens"]) for run in method_runs)
        passes = [run["target_passes"] for run in method_runs]
        ratios = [_throughput(run) / _throughput(base) for base, run in zip(baseline, method_runs)]
        entry = {
            "prompts": len(method_runs),
            "new_tokens": new_tokens,
            "acceptance_length": new_tokens / sum(passes) if all(p is not None for p in passes) and sum(passes) else None,
            "tokens_per_second_median": statistics.median(len(r["new_tokens"]) / r["seconds"] for r in method_runs),
            "speedup_median": statistics.median(ratios),
            "speedup_min": min(ratios),
            "speedup_max": max(ratios),
            "peak_memory_bytes_max": max((r["peak_memory_bytes"] or 0) for r in method_runs) or None,
        }
        positions = position_acceptance(method_runs, tree=method.kind == "tree")
        if positions is not None:
            entry["position_acceptance"] = positions
        if temperature == 0:
            mismatches = [i for i, (base, run) in enumerate(zip(baseline, method_runs)) if base["new_tokens"] != run["new_tokens"]]
            entry["identical_to_ar"] = not mismatches
            entry["mismatched_prompts"] = mismatches
            # how far outputs agree where exactness is not promised (a bfloat16 target): the share of prompts
            # identical, and of ar's tokens before each prompt's first difference
            agreed = sum(_common_prefix(base["new_tokens"], run["new_tokens"]) for base, run in zip(baseline, method_runs))
            entry["identical_prompt_share"] = 1 - len(mismatches) / len(method_runs) if method_runs else None
            entry["identical_token_share"] = agreed / max(1, sum(len(base["new_tokens"]) for base in baseline[: len(method_runs)]))
        summary[method.name] = entry
    return summary


def position_acceptance(runs: list[dict], tree: bool = False) -> dict | None:
    """Where drafts die: over all drafting rounds of `runs` (target passes that verified at least one draft), per
    draft position k (1-based), the share of rounds whose k-th draft token was accepted (`accepted[k - 1]`; it falls with k, and `accepted[0]` is the first
    draft's acceptance rate) and, for chains, the share of rounds that drafted a k-th token at all
    (`drafted[k - 1]`: below 1 where the schedule drafts shorter). None for methods that record no rounds."""
    rounds = []
    for run in runs:
        drafted, accepted = run.get("drafted_per_pass") or [], run.get("accepted_per_pass") or []
        # the read-out's accepted list also has the prefill's 0 first: the rounds are the last len(drafted) entries
        # a pass that drafted nothing (e.g. the last token before max_new_tokens) is not a drafting round
        rounds += [(d, a) for d, a in zip(drafted, accepted[len(accepted) - len(drafted) :]) if d > 0]
    if not rounds:
        return None
    deepest = max(1, max(accepted for _, accepted in rounds) if tree else max(drafted for drafted, _ in rounds))
    result = {"rounds": len(rounds), "accepted": [sum(a >= k for _, a in rounds) / len(rounds) for k in range(1, deepest + 1)]}
    if not tree:
        result["drafted"] = [sum(d >= k for d, _ in rounds) / len(rounds) for k in range(1, deepest + 1)]
    return result


def _common_prefix(first: list[int], second: list[int]) -> int:
    """How many leading tokens the two outputs share."""
    for index, (a, b) in enumerate(zip(first, second)):
        if a != b:
            return index
    return min(len(first), len(second))


def machine_description() -> dict:
    """Platform, Python/torch/transformers versions, CPU/GPU model and thread count, recorded with results."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
    import transformers

    info["transformers"] = transformers.__version__
    info["cpu_count"] = __import__("os").cpu_count()
    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def correctness_failures(result: dict) -> list[str]:
    """Methods whose greedy output differs from plain decoding (must be empty at T=0)."""
    return [name for name, entry in result["summary"].items() if entry.get("identical_to_ar") is False]


def format_speedup(value: float | None) -> str:
    """A speedup as `1.23x` for tables; `-` when missing or NaN."""
    return "-" if value is None or math.isnan(value) else f"{value:.2f}x"
