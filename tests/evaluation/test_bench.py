"""`hf-dream bench` on a tiny target: every method runs interleaved, results are checked and reported."""

from __future__ import annotations

import json

import pytest
from conftest import cached_target

from hf_dream import DreamDraftModel
from hf_dream.cli import main
from hf_dream.evaluation import bench
from hf_dream.evaluation.bench import Method, summarize
from hf_dream.evaluation.report import markdown_table


@pytest.fixture
def setup(tmp_path):
    target = cached_target("idefics3")
    DreamDraftModel.from_target(target).save_pretrained(tmp_path / "dream")
    DreamDraftModel.from_target(target, fusion="concat").save_pretrained(tmp_path / "eagle")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"image": f"{i}.png", "prompt": f"question {i}"}) for i in range(3)) + "\n")
    return tmp_path, prompts


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_bench_writes_json_table_and_plot(setup, temperature):
    tmp_path, prompts = setup
    out = tmp_path / f"results-{temperature}.json"
    argv = [
        "bench", "--target", "tiny:idefics3", "--drafter", str(tmp_path / "dream"), "--drafter", str(tmp_path / "eagle"),
        "--prompts", str(prompts), "--methods", "ar,prompt_lookup,eagle,dream", "--max-new-tokens", "12",
        "--temperature", str(temperature), "--out", str(out),
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert list(result["summary"]) == ["ar", "prompt_lookup", "eagle", "dream"]
    for entry in result["summary"].values():
        assert entry["prompts"] == 3 and entry["new_tokens"] == 36
        assert entry["speedup_median"] > 0
        if temperature == 0:
            assert entry["identical_to_ar"] is True
    assert result["summary"]["ar"]["acceptance_length"] == 1.0
    assert result["summary"]["dream"]["acceptance_length"] >= 1.0
    assert result["model_bytes"]["dream"]["overhead_vs_target"] > 0
    assert result["settings"]["command"].startswith("hf-dream bench --target tiny:idefics3")
    assert "| dream |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 1000
    # where drafts die: a round per target pass that verified drafts, shares falling with the position
    for name in ("eagle", "dream"):
        runs, positions = result["runs"][name], result["summary"][name]["position_acceptance"]
        assert len(runs[0]["drafted_per_pass"]) == runs[0]["target_passes"] - 1  # every pass after the prefill
        assert positions["rounds"] == sum(1 for run in runs for drafted in run["drafted_per_pass"] if drafted)
        assert positions["drafted"][0] == 1.0 and len(positions["accepted"]) == len(positions["drafted"])
        assert all(a >= b for a, b in zip(positions["accepted"], positions["accepted"][1:]))
        accepted = sum(sum(run["accepted_per_pass"]) for run in runs)
        assert sum(positions["accepted"]) * positions["rounds"] == pytest.approx(accepted)
    assert "position_acceptance" not in result["summary"]["ar"]
    assert "Where drafts die" in out.with_suffix(".md").read_text()


def test_position_acceptance_counts_rounds_per_draft_position():
    # the read-out's accepted list starts with the prefill's 0; round 1 drafts 3 and keeps 2, round 2 drafts 2, keeps 0
    # (a last pass that drafts nothing is no round)
    chain = [{"drafted_per_pass": [3, 2], "accepted_per_pass": [0, 2, 0]}, {"drafted_per_pass": [3, 0], "accepted_per_pass": [0, 3, 0]}]
    assert bench.position_acceptance(chain) == {"rounds": 3, "accepted": [2 / 3, 2 / 3, 1 / 3], "drafted": [1.0, 1.0, 2 / 3]}
    # trees: a round's accepted path may be as deep as the tree; nodes drafted are not positions
    tree = [{"drafted_per_pass": [10, 10], "accepted_per_pass": [0, 4, 1]}]
    assert bench.position_acceptance(tree, tree=True) == {"rounds": 2, "accepted": [1.0, 0.5, 0.5, 0.5]}
    assert bench.position_acceptance([{"drafted_per_pass": None, "accepted_per_pass": None}]) is None


def test_a_greedy_mismatch_is_a_correctness_failure():
    runs = {
        "ar": [{"seconds": 1.0, "new_tokens": [1, 2, 3], "target_passes": 3, "peak_memory_bytes": 1}],
        "dream": [{"seconds": 0.5, "new_tokens": [1, 2, 4], "target_passes": 2, "peak_memory_bytes": 1}],
    }
    summary = summarize(runs, [Method("ar", "ar"), Method("dream", "chain")], temperature=0.0)
    assert summary["dream"]["identical_to_ar"] is False and summary["dream"]["mismatched_prompts"] == [0]
    assert summary["dream"]["identical_prompt_share"] == 0.0 and summary["dream"]["identical_token_share"] == 2 / 3
    assert summary["ar"]["identical_prompt_share"] == 1.0 and summary["ar"]["identical_token_share"] == 1.0
    assert "0% of prompts, 67% of tokens before a difference" in markdown_table({"summary": summary})
    assert summary["dream"]["speedup_median"] == 2.0 and summary["dream"]["acceptance_length"] == 1.5


def test_unknown_method_lists_the_available_ones(setup):
    tmp_path, prompts = setup
    with pytest.raises(ValueError, match="available with these drafters: ar, prompt_lookup, dream, dream_tree"):
        main(["bench", "--target", "tiny:idefics3", "--drafter", str(tmp_path / "dream"), "--prompts", str(prompts), "--methods", "ar,medusa", "--out", str(tmp_path / "r.json")])


def test_draft_schedule_per_drafter(setup, monkeypatch):
    tmp_path, prompts = setup
    out = tmp_path / "schedules.json"
    argv = [
        "bench", "--target", "tiny:idefics3", "--drafter", f"fixed={tmp_path / 'dream'}", "--drafter", f"timed={tmp_path / 'dream'}",
        "--draft-schedule", "timed=auto", "--prompts", str(prompts), "--methods", "ar,fixed,timed", "--max-new-tokens", "12", "--out", str(out),
    ]
    schedules = {}
    run_one = bench.run_one

    def spy(target, method, *args, **kwargs):
        if method.drafter is not None:  # the schedule goes to generate() per call; the drafter's default otherwise
            schedules[method.name] = method.options.get("draft_schedule", method.drafter.decoding_options.draft_schedule)
        else:
            schedules[method.name] = None
        return run_one(target, method, *args, **kwargs)

    monkeypatch.setattr(bench, "run_one", spy)
    assert main(argv) == 0
    assert schedules == {"ar": None, "fixed": "constant", "timed": "auto"}
    assert json.loads(out.read_text())["summary"]["timed"]["identical_to_ar"] is True


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--draft-schedule", "fast", "must be one of constant, heuristic, auto"),
        ("--draft-schedule", "nobody=auto", "--draft-schedule names 'nobody', which is not a drafter"),
        ("--drafter-image", "shuffled", "must be one of real, blank"),
        ("--drafter-image", "nobody=blank", "--drafter-image names 'nobody', which is not a drafter"),
    ],
)
def test_bad_per_drafter_option_is_refused(setup, option, value, message):
    tmp_path, prompts = setup
    with pytest.raises(SystemExit, match=message):
        main(["bench", "--target", "tiny:idefics3", "--drafter", str(tmp_path / "dream"), "--prompts", str(prompts), option, value])


def test_blank_drafter_image_per_drafter_reaches_chain_and_tree(setup, monkeypatch):
    """Issue 11's "does the drafter use the image": one drafter twice, once shown a blank picture; outputs unchanged."""
    tmp_path, prompts = setup
    out = tmp_path / "images.json"
    argv = [
        "bench", "--target", "tiny:idefics3", "--drafter", f"seeing={tmp_path / 'dream'}", "--drafter", f"blind={tmp_path / 'dream'}",
        "--drafter-image", "blind=blank", "--prompts", str(prompts), "--methods", "ar,seeing,blind,blind_tree", "--max-new-tokens", "12",
        "--out", str(out),
    ]
    views = {}
    run_one = bench.run_one

    def spy(target, method, *args, **kwargs):
        views[method.name] = method.options.get("drafter_image", "real")
        return run_one(target, method, *args, **kwargs)

    monkeypatch.setattr(bench, "run_one", spy)
    assert main(argv) == 0
    assert views == {"ar": "real", "seeing": "real", "blind": "blank", "blind_tree": "blank"}
    assert all(entry["identical_to_ar"] for entry in json.loads(out.read_text())["summary"].values())


def test_a_method_that_cannot_run_is_reported_not_fatal(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"image": "a.png", "prompt": "q"}) + "\n")
    out = tmp_path / "r.json"
    assert main(["bench", "--target", "tiny:gemma3", "--prompts", str(prompts), "--methods", "ar,prompt_lookup", "--max-new-tokens", "6", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    # stock prompt lookup indexes the embedding with Gemma3's out-of-vocabulary image id
    assert set(result["summary"]) == {"ar"}
    assert result["method_errors"]["prompt_lookup"].startswith("IndexError")


def test_a_method_that_fails_later_in_the_run_is_dropped_and_reported(monkeypatch):
    from hf_dream.evaluation import bench

    real_run_one = bench.run_one

    def flaky(target, method, inputs, max_new_tokens, temperature, seed=0):
        if method.name == "dream" and seed == 1:
            raise RuntimeError("broke on the second prompt")
        return real_run_one(target, method, inputs, max_new_tokens, temperature, seed=seed)

    monkeypatch.setattr(bench, "run_one", flaky)
    from hf_dream import DreamDraftModel
    from hf_dream.testing import build_tiny_target, make_tiny_inputs

    target = build_tiny_target("llava")
    drafter = DreamDraftModel.from_target(target)
    methods = bench.build_methods(["ar", "dream"], {"dream": drafter})
    prompts = [make_tiny_inputs(target, seed=s) for s in range(3)]
    result = bench.benchmark(target, prompts, methods, max_new_tokens=6, warmup=False, show_progress=False)
    assert set(result["summary"]) == {"ar"} and set(result["runs"]) == {"ar"}
    assert result["method_errors"]["dream"] == "prompt 1: RuntimeError: broke on the second prompt"


def test_sampled_speedup_compares_tokens_per_second_not_times():
    # sampling: the drafted run stopped after 2 tokens, plain decoding ran 8 in twice the time;
    # per token the drafted run is slower (0.25 s vs 0.125 s), whatever the raw times say
    runs = {
        "ar": [{"seconds": 1.0, "new_tokens": list(range(8)), "target_passes": 8, "peak_memory_bytes": 1}],
        "dream": [{"seconds": 0.5, "new_tokens": [1, 2], "target_passes": 2, "peak_memory_bytes": 1}],
    }
    summary = summarize(runs, [Method("ar", "ar"), Method("dream", "chain")], temperature=1.0)
    assert summary["dream"]["speedup_median"] == 0.5
