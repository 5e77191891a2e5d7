"""The v2 benchmark prompt sets: held out from every training example, worded as each set says, reproducible."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from hf_dream.reference.drafter_data import SCENE_SEED_OFFSET
from hf_dream.reference.instructions import all_wordings
from hf_dream.reference.prompts import BENCHMARK_SETS, benchmark_sets
from hf_dream.reference.scenes import EVAL, TRAIN

pytestmark = pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="the photos come from scikit-image")


def wording_of(prompt: str, wordings: set[str]) -> bool:
    """Whether `prompt` is one of `wordings` with its {object} / {other} slots filled in."""
    patterns = [re.escape(w).replace(re.escape("{object}"), ".+").replace(re.escape("{other}"), ".+") for w in wordings]
    return any(re.fullmatch(p, prompt) for p in patterns)


def test_benchmark_sets_are_held_out_worded_as_named_and_reproducible(tmp_path):
    paths = benchmark_sets(tmp_path / "a", num=24)
    assert set(paths) == set(BENCHMARK_SETS)
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in paths.items()}
    assert all(len(r) == 24 for r in rows.values())
    train, heldout = all_wordings("train"), all_wordings("heldout")
    for name, wordings in (("scenes", train), ("scenes-new-wordings", heldout)):
        seeds = [int(row["image"].removeprefix("images/scene-").removesuffix(".png")) for row in rows[name]]
        assert all(seed in EVAL and seed not in TRAIN for seed in seeds) and len(set(seeds)) == 24
        assert all(wording_of(row["prompt"], wordings) for row in rows[name])
        assert all((paths[name].parent / row["image"]).is_file() for row in rows[name])
    assert not {row["image"] for row in rows["scenes"]} & {row["image"] for row in rows["scenes-new-wordings"]}
    assert all(wording_of(row["prompt"], heldout) for row in rows["photos"])
    assert len({row["image"] for row in rows["photos"]}) >= 8  # every bundled photo, several prompts each
    assert SCENE_SEED_OFFSET not in EVAL  # the drafter data draws from the training split
    again = benchmark_sets(tmp_path / "b", num=24)
    assert all(again[name].read_text() == paths[name].read_text() for name in BENCHMARK_SETS)
