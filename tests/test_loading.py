"""Target specs and prompt files: bad input is named before anything is loaded."""

from __future__ import annotations

import json

import pytest

from hf_dream.loading import read_prompts, resolve_target_spec


def test_a_bare_reference_name_is_a_reference_target():
    assert resolve_target_spec("smolvlm-ref") == ("reference", "smolvlm-ref")
    assert resolve_target_spec("reference:gemma3-ref") == ("reference", "gemma3-ref")
    assert resolve_target_spec("tiny:llava:3") == ("tiny", "tiny:llava:3")
    assert resolve_target_spec("someone/some-vlm") == ("hub", "someone/some-vlm")


@pytest.mark.parametrize("spec", ["smolvlm-reff", "reference:nope", "tiny:llama", "/no/such/folder", "./model"])
def test_an_unknown_spec_lists_the_valid_forms(spec):
    with pytest.raises(ValueError, match=r"valid target specs: 'tiny:<family>\[:<seed>\]' .*'reference:<name>' or just '<name>' \(smolvlm-ref"):
        resolve_target_spec(spec)


def test_a_missing_image_is_found_with_its_line_number(tmp_path):
    (tmp_path / "cat.png").write_bytes(b"not read here")
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"image": image, "prompt": "q"}) for image in ["cat.png", "cat.png", "catt.png"]) + "\n")
    assert len(read_prompts(path)) == 3  # unchecked by default
    with pytest.raises(FileNotFoundError, match=r"p.jsonl:3: image not found: .*catt.png"):
        read_prompts(path, check_images=True)
