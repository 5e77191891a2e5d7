"""Training curves of drafter runs (`hf-dream curves`): what the `Trainer` logged, side by side, as JSON and a plot.

A run is an `hf-dream train --output_dir` folder. Its `trainer_state.json` (the run's own, or its latest
`checkpoint-N/`'s, whichever reached more steps: a run that is still going, or was cut off, has only the latter)
holds every logged record; the training loss, the held-out losses, top-1 agreement and acceptance length are
read from it per step, so the number of steps can be chosen from the curve.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

# the logged values a curve shows, in the plot's panel order (train loss, then the held-out evaluation)
CURVE_KEYS = ("loss", "eval_loss", "eval_top1_agreement", "eval_acceptance_length")


@dataclass
class RunCurve:
    """One run's curve: `points[key]` is `[[step, value], ...]` for each of `CURVE_KEYS` it logged."""

    name: str
    source: str
    global_step: int
    points: dict[str, list[list[float]]] = field(default_factory=dict)

    def best(self, key: str, highest: bool = True) -> list[float] | None:
        """`[step, value]` of the best logged value of `key` (None if never logged)."""
        values = self.points.get(key)
        if not values:
            return None
        return (max if highest else min)(values, key=lambda point: point[1])


def latest_trainer_state(run_dir: str | Path) -> Path:
    """The `trainer_state.json` of `run_dir` that reached the most steps (the run's own or a checkpoint's)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a training run folder (an `hf-dream train --output_dir`).")
    candidates = [run_dir / "trainer_state.json", *run_dir.glob("checkpoint-*/trainer_state.json")]
    candidates = [path for path in candidates if path.is_file()]
    if not candidates:
        raise FileNotFoundError(f"{run_dir} holds no trainer_state.json (nor any checkpoint-N/ with one): has the run saved yet?")
    return max(candidates, key=lambda path: json.loads(path.read_text()).get("global_step", 0))


def read_curve(name: str, run_dir: str | Path) -> RunCurve:
    """The curve of the run in `run_dir`, named `name`."""
    path = latest_trainer_state(run_dir)
    state = json.loads(path.read_text())
    curve = RunCurve(name=name, source=str(path), global_step=int(state.get("global_step", 0)))
    for record in state.get("log_history", []):
        for key in CURVE_KEYS:
            if key in record and "step" in record:
                curve.points.setdefault(key, []).append([int(record["step"]), float(record[key])])
    return curve


def write_curves(runs: dict[str, str | Path], out: str | Path) -> dict[str, Path]:
    """Read every run (`{name: run folder}`) and write `out` (JSON: each run's points and its best held-out values)
    and `out` with `.png` (one panel per logged quantity). Returns the paths written."""
    curves = [read_curve(name, run_dir) for name, run_dir in runs.items()]
    result = {
        "runs": [asdict(curve) for curve in curves],
        "best": {
            curve.name: {
                "eval_loss": curve.best("eval_loss", highest=False),
                "eval_top1_agreement": curve.best("eval_top1_agreement"),
                "eval_acceptance_length": curve.best("eval_acceptance_length"),
            }
            for curve in curves
        },
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return {"json": out, "png": plot_curves(curves, out.with_suffix(".png"))}


def plot_curves(curves: list[RunCurve], path: str | Path) -> Path:
    """One panel per quantity of `CURVE_KEYS` that some run logged, every run a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [key for key in CURVE_KEYS if any(curve.points.get(key) for curve in curves)]
    figure, axes = plt.subplots(1, max(1, len(keys)), figsize=(3.6 * max(1, len(keys)), 3.2), squeeze=False)
    for axis, key in zip(axes[0], keys):
        for curve in curves:
            points = curve.points.get(key)
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 40 else None, label=curve.name)
        axis.set_xlabel("step")
        axis.set_title(key.replace("eval_", "held-out "), fontsize=9)
        axis.legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
