"""The `hf-dream` command line."""

from __future__ import annotations

import json
import re

import pytest

from hf_dream.cli import COMMANDS, build_parser, main


def test_demo_reports_identical_output_and_stats(capsys):
    assert main(["demo", "--tiny", "gemma3", "--max-new-tokens", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["identical"] is True
    assert result["plain_answer"] == result["dream_answer"] and len(result["plain_answer"]) == 16
    assert result["stats"]["new_tokens"] == 16 and result["stats"]["target_passes"] >= 1


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_documents_its_options(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.strip()
    flat = " ".join(text.split())
    assert not re.search(r"\(default: [^)]*\) \(default:", flat), "a default is shown twice"
    assert "(default: None)" not in flat and "(default: [])" not in flat
    for action in build_parser()._subparsers._group_actions[0].choices[name]._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{name} {action.option_strings} has no help text"
