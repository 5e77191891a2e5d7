"""Tables and plots from benchmark JSON (`hf-dream bench` writes them; model cards read them)."""

from __future__ import annotations

import json
from pathlib import Path

from .bench import format_speedup

MAX_TABLE_POSITIONS = 8  # draft positions shown in the table (the JSON has them all)


def markdown_table(result: dict) -> str:
    """One row per method: acceptance length (bonus token included), median tokens/s and speedup."""
    settings = result.get("settings", {})
    lines = [
        f"Target `{settings.get('target', '?')}`, T={settings.get('temperature', '?')}, "
        f"max_new_tokens={settings.get('max_new_tokens', '?')}, {settings.get('num_prompts', '?')} prompts, "
        f"methods interleaved per prompt; speedup = median of per-prompt tokens/s ratios vs `ar` (= time ratios at T=0).",
        "",
        "| method | acceptance length | tokens/s (median) | speedup (median) | speedup range | greedy == ar |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    for name, entry in result["summary"].items():
        tau = "-" if entry["acceptance_length"] is None else f"{entry['acceptance_length']:.2f}"
        same = {True: "yes", False: "**NO**", None: "n/a"}[entry.get("identical_to_ar")]
        if entry.get("identical_to_ar") is False and "identical_token_share" in entry:
            same += f" ({entry['identical_prompt_share']:.0%} of prompts, {entry['identical_token_share']:.0%} of tokens before a difference)"
        lines.append(
            f"| {name} | {tau} | {entry['tokens_per_second_median']:.1f} | {format_speedup(entry['speedup_median'])} "
            f"| {format_speedup(entry['speedup_min'])} - {format_speedup(entry['speedup_max'])} | {same} |"
        )
    positions = {name: entry["position_acceptance"] for name, entry in result["summary"].items() if entry.get("position_acceptance")}
    if positions:
        depth = min(MAX_TABLE_POSITIONS, max(len(p["accepted"]) for p in positions.values()))
        lines += [
            "",
            "Where drafts die: per draft position k, the share of drafting rounds whose k-th draft token was accepted.",
            "",
            "| method | rounds | " + " | ".join(f"k={k}" for k in range(1, depth + 1)) + " |",
            "|---|---:|" + "---:|" * depth,
        ]
        for name, p in positions.items():
            shares = [f"{p['accepted'][k]:.2f}" if k < len(p["accepted"]) else "-" for k in range(depth)]
            lines.append(f"| {name} | {p['rounds']} | " + " | ".join(shares) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | Path) -> Path:
    """Bar charts of median speedup and acceptance length per method, and (where drafters ran) the share of
    rounds accepting each draft position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["summary"])
    speedups = [result["summary"][n]["speedup_median"] for n in names]
    taus = [result["summary"][n]["acceptance_length"] or 0.0 for n in names]
    positions = {n: result["summary"][n]["position_acceptance"] for n in names if result["summary"][n].get("position_acceptance")}
    panels = 3 if positions else 2
    figure, axes = plt.subplots(1, panels, figsize=(max(6, 1.2 * len(names) + 3) + 3 * (panels - 2), 3.2))
    left, right = axes[0], axes[1]
    left.bar(names, speedups, color="#4c72b0")
    left.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    left.set_ylabel("speedup vs ar (median)")
    right.bar(names, taus, color="#dd8452")
    right.set_ylabel("acceptance length (incl. bonus)")
    if positions:
        for name, p in positions.items():
            axes[2].plot(range(1, len(p["accepted"]) + 1), p["accepted"], marker="o", label=name)
        axes[2].set_xlabel("draft position k")
        axes[2].set_ylabel("share of rounds accepting it")
        axes[2].set_ylim(0, 1)
        axes[2].legend(fontsize=7)
    settings = result.get("settings", {})
    figure.suptitle(f"{settings.get('target', '')}  T={settings.get('temperature', '')}", fontsize=9)
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_reports(result: dict, out: str | Path) -> dict[str, Path]:
    """Writes `out` (JSON), `out` with `.md` (table) and `.png` (plot)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    table = out.with_suffix(".md")
    table.write_text(markdown_table(result))
    return {"json": out, "markdown": table, "png": plot(result, out.with_suffix(".png"))}
