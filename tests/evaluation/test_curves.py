"""`hf-dream curves`: a run's logged training curve, from its own or its latest checkpoint's trainer_state.json."""

from __future__ import annotations

import json

import pytest

from hf_dream.cli import main
from hf_dream.evaluation.curves import latest_trainer_state, read_curve


def write_state(folder, steps, **extra):
    folder.mkdir(parents=True, exist_ok=True)
    history = []
    for step in steps:
        history.append({"step": step, "loss": 3.0 / step, "learning_rate": 1e-4})
        history.append({"step": step, "eval_loss": 2.0 / step + 0.1, "eval_top1_agreement": 0.1 * step, "eval_acceptance_length": 1 + 0.01 * step})
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": steps[-1], "log_history": history, **extra}))


def test_the_latest_checkpoint_wins_over_an_older_final_state(tmp_path):
    write_state(tmp_path / "checkpoint-2", [1, 2])
    write_state(tmp_path / "checkpoint-4", [1, 2, 3, 4])
    assert latest_trainer_state(tmp_path) == tmp_path / "checkpoint-4" / "trainer_state.json"
    curve = read_curve("dream", tmp_path)
    assert curve.global_step == 4
    assert curve.points["loss"] == [[1, 3.0], [2, 1.5], [3, 1.0], [4, 0.75]]
    assert [step for step, _ in curve.points["eval_acceptance_length"]] == [1, 2, 3, 4]
    assert curve.best("eval_loss", highest=False) == [4, pytest.approx(0.6)]
    assert curve.best("eval_top1_agreement") == [4, pytest.approx(0.4)]


def test_curves_command_writes_json_and_plot(tmp_path):
    write_state(tmp_path / "dream" / "checkpoint-3", [1, 2, 3])
    write_state(tmp_path / "eagle", [1, 2])
    out = tmp_path / "curves.json"
    assert main(["curves", "--run", f"dream={tmp_path / 'dream'}", "--run", f"eagle={tmp_path / 'eagle'}", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [run["name"] for run in result["runs"]] == ["dream", "eagle"]
    assert result["best"]["eagle"]["eval_top1_agreement"] == [2, pytest.approx(0.2)]
    assert out.with_suffix(".png").stat().st_size > 1000


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "at least one --run"),
        (["--run", "nameless"], "expected NAME=DIR"),
        (["--run", "a=RUN", "--run", "a=RUN"], "two runs named 'a'"),
    ],
)
def test_bad_runs_are_refused(tmp_path, argv, message):
    argv = [arg.replace("RUN", str(tmp_path)) for arg in argv]
    with pytest.raises(SystemExit, match=message):
        main(["curves", *argv, "--out", str(tmp_path / "c.json")])


def test_a_folder_without_a_trainer_state_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no trainer_state.json"):
        read_curve("dream", tmp_path)
