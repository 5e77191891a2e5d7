"""`hf-dream prepare-data` under `torchrun` and `accelerate launch` (two CPU processes over gloo): the ranks regenerate
disjoint shards, the union is the single-process output, and an interrupted run resumes without a duplicated or
missing example."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_from_disk
from test_trainer import free_port

from hf_dream.cli import main

NUM_PROMPTS, SHARD_SIZE = 10, 2  # five shards: rank 0 takes 0, 2, 4 and rank 1 takes 1, 3


def prepare_command(prompts: Path, output: Path) -> list[str]:
    return ["prepare-data", "--target", "tiny:llava", "--prompts", str(prompts), "--output", str(output),
            "--max-new-tokens", "6", "--batch-size", "2", "--shard-size", str(SHARD_SIZE)]  # fmt: skip


def launch(launcher: str, prompts: Path, output: Path) -> subprocess.CompletedProcess:
    if launcher == "torchrun":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    else:  # CPU-only: `--multi_gpu` selects accelerate's torchrun-based launcher
        launcher = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--main_process_port",
            free_port(),
        ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[2]))
    result = subprocess.run(
        [*launcher, "-m", "hf_dream", *prepare_command(prompts, output)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def rows(folder: Path) -> list[tuple]:
    dataset = load_from_disk(str(folder / "dataset"))
    return [(row["source_index"], tuple(row["input_ids"]), row["prompt_length"]) for row in dataset]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_ranks_take_disjoint_shards_whose_union_is_the_single_process_output_also_after_an_interruption(tmp_path, launcher):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"image": f"img{i}.png", "prompt": f"Describe picture {i}."}) + "\n" for i in range(NUM_PROMPTS))
    )
    assert main(prepare_command(prompts, tmp_path / "single")) == 0
    single = rows(tmp_path / "single")
    assert [index for index, *_ in single] == list(range(NUM_PROMPTS))

    result = launch(launcher, prompts, tmp_path / "ranks")
    # each rank regenerated its own shards: rank 0 shards 0, 2, 4 (6 examples), rank 1 shards 1, 3 (4 examples)
    assert "regenerating (rank 0/2): 100%|██████████| 6/6" in result.stderr
    assert "regenerating (rank 1/2): 100%|██████████| 4/4" in result.stderr
    assert rows(tmp_path / "ranks") == single
    assert result.stdout.count(f"{NUM_PROMPTS} examples") == 1  # rank 0 reports

    # interrupted: shards 1 and 4 (one of each rank) never written, one left half-written, no final dataset
    shards = tmp_path / "ranks" / "shards"
    for shard in ("00001", "00004"):
        shutil.rmtree(shards / shard)
    (shards / ".00004.tmp").mkdir()
    shutil.rmtree(tmp_path / "ranks" / "dataset")
    resumed = launch(launcher, prompts, tmp_path / "ranks")
    assert "(rank 0/2): 100%|██████████| 2/2" in resumed.stderr and "(rank 1/2): 100%|██████████| 2/2" in resumed.stderr
    assert rows(tmp_path / "ranks") == single  # no duplicated or missing example
    assert sorted(path.name for path in shards.iterdir()) == [f"{i:05d}" for i in range(NUM_PROMPTS // SHARD_SIZE)]
