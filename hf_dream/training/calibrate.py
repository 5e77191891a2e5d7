"""Which target layer does entropy-adaptive selection pick? (`hf-dream calibrate`)

The DREAM paper never reports the chosen layers; this measures their distribution for a target
on prepared data: per response token, the candidate layer with the lowest attention entropy.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from ..features import read_teacher
from ..targets import get_target_adapter
from .data import DreamDataCollator, response_mask


def calibrate_layers(target, dataset, candidate_layers=None, num_samples: int = 64, batch_size: int = 4, show_progress=True) -> dict:
    """Counts of the entropy-selected layer over response tokens of the first `num_samples` rows."""
    adapter = get_target_adapter(target)
    candidates = list(candidate_layers or adapter.entropy_candidate_layers())
    if min(candidates) < 0 or max(candidates) >= adapter.num_hidden_layers:
        raise ValueError(f"Candidate layers must lie in [0, {adapter.num_hidden_layers - 1}], got {candidates}.")
    collate = DreamDataCollator(target.generation_config.pad_token_id or 0)
    counts, tokens = Counter(), 0
    rows = min(num_samples, len(dataset))
    for start in tqdm(range(0, rows, batch_size), desc="calibrating", disable=not show_progress):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, rows))])
        batch = {k: v.to(target.device) for k, v in batch.items()}
        signals = read_teacher(adapter, batch, candidate_layers=candidates)
        chosen = signals.mid_layers[response_mask(batch)]
        counts.update(chosen.tolist())
        tokens += chosen.numel()
    return {
        "target": adapter.name_or_path or adapter.config.model_type,
        "num_hidden_layers": adapter.num_hidden_layers,
        "candidate_layers": candidates,
        "samples": rows,
        "response_tokens": tokens,
        "counts": {str(layer): counts.get(layer, 0) for layer in candidates},
        "fractions": {str(layer): counts.get(layer, 0) / max(tokens, 1) for layer in candidates},
    }


def write_calibration_report(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """Writes `calibration.json`, `calibration.md` (table) and `calibration.png` (histogram)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "calibration.json", "markdown": out_dir / "calibration.md", "png": out_dir / "calibration.png"}
    paths["json"].write_text(json.dumps(result, indent=2))
    lines = [
        f"Entropy-selected target layer per response token: {result['target']} "
        f"({result['num_hidden_layers']} layers, {result['samples']} samples, {result['response_tokens']} tokens)",
        "",
        "| layer | tokens | fraction |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {layer} | {result['counts'][layer]} | {result['fractions'][layer]:.1%} |" for layer in result["counts"]]
    paths["markdown"].write_text("\n".join(lines) + "\n")
    layers = [int(layer) for layer in result["counts"]]
    figure, axis = plt.subplots(figsize=(max(4, 0.45 * len(layers) + 2), 3))
    axis.bar(layers, [result["fractions"][str(layer)] for layer in layers], color="#4c72b0")
    axis.set_xlabel("target layer (lowest attention entropy)")
    axis.set_ylabel("fraction of response tokens")
    axis.set_xticks(layers)
    axis.set_title(f"DREAM layer selection: {result['target']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(paths["png"], dpi=120)
    plt.close(figure)
    return paths
