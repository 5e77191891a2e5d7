"""Generate every publishable drafter folder in model_cards/ from its `target_config.json`.

    python model_cards/generate.py            # (re)write config.json, train.yaml and README.md everywhere
    python model_cards/generate.py --check    # write nothing; exit 1 if a committed file is stale

Input, per folder (the folder name is the Hub repository name under `hf-dream/`):
`target_config.json`, the target's public configuration with its provenance (transcribed, since
the Hub cannot be reached where these folders are generated). Outputs: `config.json` (the
DreamConfig built from it by `hf_dream.hub.dream_config_from_target_config`, nothing allocated),
`train.yaml` (the paper recipe as an `hf-dream train --config` file) and `README.md` (the card,
by `hf_dream.hub.render_card`). Each folder is laid out exactly as `hf-dream push` would upload it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hf_dream.hub import (
    drafter_parameter_count,
    dream_config_from_target_config,
    planned_recipe,
    read_target_record,
    render_card,
    target_parameter_count,
    training_estimate,
)

HERE = Path(__file__).resolve().parent


def drafter_folders(root: Path = HERE) -> list[Path]:
    return sorted(path.parent for path in root.glob("*/target_config.json"))


def generated_files(folder: Path) -> dict[str, str]:
    """`{file name: content}` of everything generated in `folder` (the card is rendered last,
    from the other files as they will be written)."""
    record = read_target_record(folder)
    config = dream_config_from_target_config(record["config"], target_name_or_path=record["repo_id"])
    config.architectures = ["DreamDraftModel"]  # what DreamDraftModel.save_pretrained records
    estimate = training_estimate(
        config, drafter_parameter_count(config), target_parameter_count(record["config"]), int(record["image_tokens"]["typical"])
    )
    files = {
        "config.json": config.to_json_string(use_diff=True),
        "train.yaml": planned_recipe(record["repo_id"], folder.name, estimate["prepare_batch_size"])["train_yaml"],
    }
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if any generated file is stale")
    args = parser.parse_args(argv)
    stale = []
    for folder in drafter_folders():
        for name, content in generated_files(folder).items():
            path = folder / name
            if args.check:
                if not path.exists() or path.read_text() != content:
                    stale.append(path)
            else:
                path.write_text(content)
        card = str(render_card(folder))  # reads the config.json and train.yaml written above
        readme = folder / "README.md"
        if args.check:
            if not readme.exists() or readme.read_text() != card:
                stale.append(readme)
        else:
            readme.write_text(card)
            print(f"{folder.name}: {json.loads((folder / 'config.json').read_text())['target_name_or_path']}")
    if stale:
        print("stale (run `python model_cards/generate.py`): " + ", ".join(str(p) for p in stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
