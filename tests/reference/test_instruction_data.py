"""Instruction data: the plan is stable, generation resumes and refuses another plan, packing is deterministic."""

from __future__ import annotations

import gzip
import json

import pytest
import test_smolvlm_reference as smolvlm_tests

from hf_dream.reference import instruction_data, smolvlm
from hf_dream.reference.scenes import TRAIN


def test_plan_is_prefix_stable_and_uses_training_seeds_and_wordings():
    from hf_dream.reference.instructions import all_wordings

    short, long = instruction_data.example_plan(5), instruction_data.example_plan(9)
    assert long[:5] == short
    assert all(e.seed in TRAIN for e in long)
    heldout = all_wordings("heldout")
    assert not any(e.instruction in heldout for e in long)


@pytest.fixture
def tiny_responder():
    tokenizer = smolvlm_tests.tiny_tokenizer()
    lm = smolvlm_tests.tiny_text_lm(len(tokenizer))
    responder = smolvlm.text_responder(tokenizer)
    return lm, tokenizer, responder


def test_generation_resumes_after_a_kill_and_refuses_another_plan(tiny_responder, tmp_path):
    lm, tokenizer, responder = tiny_responder
    plan = instruction_data.example_plan(5)
    partial = tmp_path / "partial.jsonl"
    full = instruction_data.generate_responses(lm, tokenizer, responder, plan, partial, batch_size=2, max_new_tokens=4, progress=False)
    assert [e.seed for e in full] == [e.seed for e in plan] and all(e.response is not None for e in full)
    # a kill mid-write: the first two lines survive, the third is cut
    lines = partial.read_text().splitlines()
    partial.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:10])
    logs = []
    resumed = instruction_data.generate_responses(lm, tokenizer, responder, plan, partial, batch_size=2, max_new_tokens=4,
                                                  progress=False, log=logs.append)
    assert any("2 of 5" in line for line in logs)
    assert [e.seed for e in resumed] == [e.seed for e in plan]
    assert [json.loads(line)["seed"] for line in partial.read_text().splitlines()] == [e.seed for e in plan]
    other = instruction_data.example_plan(3, offset=100)
    with pytest.raises(ValueError, match="another plan"):
        instruction_data.generate_responses(lm, tokenizer, responder, other, partial, progress=False)


def test_pack_is_deterministic_and_reads_back(tiny_responder, tmp_path):
    examples = [instruction_data.InstructionExample(1, "describe", "Describe the picture.", "A red circle.", 4, True)]
    a = instruction_data.pack(examples, tmp_path / "a.jsonl.gz", {"command": "x"})
    first = a.read_bytes()
    instruction_data.pack(examples, a, {"command": "x"})
    assert a.read_bytes() == first
    assert instruction_data.read_examples(a) == examples
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["examples"] == 1 and record["response_tokens"] == 4 and record["kinds"] == {"describe": 1}
    with gzip.open(a, "rt") as f:
        assert json.loads(f.readline())["response"] == "A red circle."
    with pytest.raises(FileNotFoundError, match="make-data"):
        instruction_data.read_examples(tmp_path / "missing.jsonl.gz")


def test_committed_data_is_training_only():
    path = instruction_data.data_path("smolvlm-ref")
    if not path.is_file():
        pytest.skip("no committed instruction data yet")
    examples = instruction_data.read_examples(path)
    assert len(examples) >= 500 and all(e.seed in TRAIN and e.response for e in examples)
    assert examples[:50] == [instruction_data.InstructionExample(p.seed, p.kind, p.instruction, e.response, e.response_tokens, e.finished)
                             for p, e in zip(instruction_data.example_plan(50), examples[:50])]
