"""`import hf_dream`: the public names, training exported lazily as trl does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hf_dream

LAZY = ("DreamTrainer", "DreamTrainingArguments", "prepare_dataset")

PROBE = r"""
import json, sys
import hf_dream
before = sorted(m for m in sys.modules if m.startswith("hf_dream.training") or m == "transformers.trainer")
from hf_dream import DreamTrainer, DreamTrainingArguments, prepare_dataset
import hf_dream.training.data as data, hf_dream.training.trainer as trainer
same = DreamTrainer is trainer.DreamTrainer and DreamTrainingArguments is trainer.DreamTrainingArguments and prepare_dataset is data.prepare_dataset
print(json.dumps({"before": before, "same": same}))
"""


def test_training_names_are_exported_lazily():
    # the hf_dream under test, whichever way this process found it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(hf_dream.__file__).parents[1])}
    completed = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["before"] == [], f"`import hf_dream` imported {result['before']}: the trainer must load on first use only"
    assert result["same"]


def test_lazy_names_are_listed_and_unknown_names_fail_clearly():
    assert set(LAZY) <= set(hf_dream.__all__) and set(LAZY) <= set(dir(hf_dream))
    try:
        hf_dream.DreamTrainerr  # noqa: B018
    except AttributeError as error:
        assert "has no attribute 'DreamTrainerr'" in str(error)
    else:
        raise AssertionError("a mistyped name must raise AttributeError")
