"""Model cards of drafter folders: rendered from the folder's files only, and validated before upload."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..configuration_dream import DreamConfig
from ..generation.options import options_from_config
from ..targets import get_target_adapter
from .estimates import planned_recipe, training_estimate
from .remote_code import exported_code_files
from .sizing import ConfigOnlyTarget, drafter_parameter_count, read_target_record, target_config_from_dict, target_parameter_count

# The card template is package data (`hf_dream/templates/`, declared in pyproject.toml).
CARD_TEMPLATE = resources.files("hf_dream").joinpath("templates", "drafter_card.md")
LIBRARY_NAME = "hf-dream"
PIPELINE_TAG = "image-text-to-text"
BASE_TAGS = ("speculative-decoding", "dream", "vision-language-model", "draft-model")
REQUIRED_CARD_KEYS = ("library_name", "base_model", "pipeline_tag", "tags", "license")
NO_WEIGHTS_STATUS = "no weights yet — config and recipe only"


class CardValidationError(ValueError):
    """A model card whose metadata the Hub would reject or that misses what hf-dream requires."""


def card_template() -> str:
    """The Jinja template of drafter cards, read from the installed package."""
    return CARD_TEMPLATE.read_text(encoding="utf-8")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a drafter folder, sorted."""
    return sorted(Path(folder).glob("*.safetensors"))


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}" if unit == "B" else f"{n / scale:.1f}{unit}"
    return str(int(n))


def expected_base_model(target: str | None) -> str | None:
    """The `base_model` a card must name: the target's repo id, or for an offline reference target
    (`reference:<name>`, built locally) the public model its text weights come from."""
    if target and target.startswith("reference:"):
        from ..reference import REFERENCE_BASE_MODELS

        return REFERENCE_BASE_MODELS.get(target.split(":", 1)[1])
    return target


def _is_repo_id(value: str | None) -> bool:
    """`owner/name` in the Hub's syntax (a target spec such as `tiny:llava` or `/abs/path` is not)."""
    if not isinstance(value, str) or value.count("/") != 1 or value.startswith((".", "/")):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _layer_ranges(layers: Sequence[int] | None) -> str:
    if not layers:
        return "none"
    layers = sorted(layers)
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
    return "layers " + ", ".join(map(str, layers))


def _architecture(config: DreamConfig, parameters: int) -> dict:
    if config.fusion == "cross_attention":
        blocks = (
            "initial decoder block (no input norm) -> gated cross-attention block over the target's last-layer "
            "features -> final decoder block -> RMSNorm -> the target's lm_head"
        )
    elif config.fusion == "cross_attention_concat":
        blocks = (
            "projection of [token embedding; previous target feature] -> initial decoder block -> gated "
            "cross-attention block over the target's last-layer features -> final decoder block -> RMSNorm -> the "
            "target's lm_head (DREAM with EAGLE's input)"
        )
    else:
        blocks = (
            "projection of [token embedding; previous target feature] -> 3 decoder blocks -> RMSNorm -> the "
            "target's lm_head (EAGLE-style baseline)"
        )
    if config.feature_layers is not None:
        blocks += (f"; the target feature it reads is a linear fusion of the target's hidden states "
                   f"{', '.join(map(str, config.feature_layers))} (EAGLE-3-style)")
    keep = config.visual_keep_ratio
    keep_text = (
        "no compression: the drafter sees every visual token"
        if keep >= 1.0
        else f"the {1 - keep:.0%} of visual tokens that get the least attention in the target's last layer are "
        "dropped from the drafter's input only; the target sees all"
    )
    vocab = (
        f"the target's full vocabulary ({config.vocab_size:,} tokens)"
        if config.draft_vocab_size is None
        else f"a reduced draft vocabulary of {config.draft_vocab_size:,} of the target's {config.vocab_size:,} tokens "
        "(id map saved as the `draft_vocab` buffer; decoding stays lossless)"
    )
    return {
        "output_vocabulary": vocab,
        "parameters": parameters,
        "parameters_text": f"{parameters:,} ({_count(parameters)})",
        "blocks": blocks,
        "fusion": config.fusion,
        "visual_keep_ratio": keep,
        "keep_text": keep_text,
        "entropy_layers": _layer_ranges(config.entropy_candidate_layers),
        # the drafter's default decoding options (per-call generation settings, not config fields)
        **{key: value for key, value in options_from_config(config).to_dict().items() if key in ("num_draft_tokens", "draft_schedule")},
        **{
            key: getattr(config, key)
            for key in (
                "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size", "target_model_type", "target_num_hidden_layers",
                "target_image_token_id",
            )
        },
    }


def _machine_text(machine) -> str:
    if not isinstance(machine, dict):
        return str(machine or "machine not recorded")
    device = machine.get("gpu") or machine.get("cpu") or machine.get("platform") or "unknown device"
    details = [f"{key} {machine[key]}" for key in ("torch", "transformers") if machine.get(key)]
    if not machine.get("gpu") and machine.get("torch_threads"):
        details.append(f"{machine['torch_threads']} threads")
    return device + (f" ({', '.join(details)})" if details else "")


def _format(value, pattern: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, pattern) + suffix


def benchmark_section(result: dict, source: str, drafter_target: str | None = None) -> dict:
    """One results table of a card, generated from `hf-dream bench` JSON (`result`).

    Notes are added, not hidden, when greedy output differed from plain decoding or when the
    benchmark names another Hub target than the drafter's.
    """
    settings = result.get("settings", {})
    notes = []
    failed = [name for name, entry in result["summary"].items() if entry.get("identical_to_ar") is False]
    if failed:
        notes.append(f"CORRECTNESS FAILURE: greedy output differed from plain decoding for {', '.join(failed)}")
    bench_target = settings.get("target")
    if drafter_target and _is_repo_id(bench_target) and bench_target != drafter_target:
        notes.append(f"measured on {bench_target}, not on this drafter's target {drafter_target}")
    rows = []
    for method, entry in result["summary"].items():
        rows.append(
            {
                "method": method,
                "acceptance_length": _format(entry.get("acceptance_length"), ".2f"),
                "speedup": _format(entry.get("speedup_median"), ".2f", "x"),
                "tokens_per_second": _format(entry.get("tokens_per_second_median"), ".1f"),
                "identical": {True: "yes", False: "**NO**"}.get(entry.get("identical_to_ar"), "n/a (sampling)"),
            }
        )
    return {
        "source": source,
        "target": settings.get("target", "?"),
        "temperature": settings.get("temperature", "?"),
        "max_new_tokens": settings.get("max_new_tokens", "?"),
        "num_prompts": settings.get("num_prompts", "?"),
        "machine": _machine_text(settings.get("machine")),
        "date": settings.get("date", "date not recorded"),
        "command": settings.get("command", "command not recorded"),
        "drafters": ", ".join(settings.get("drafters") or []) or None,
        "notes": notes,
        "rows": rows,
    }


def render_card(drafter_dir: str | Path, benchmark_jsons: Iterable[str | Path | dict] = (), **extra) -> ModelCard:
    """The model card of a drafter folder, from its files only.

    Reads `config.json` (architecture, target), `target_config.json` (target's parameter count,
    provenance, estimates), `training.json` (the recipe actually run), `train.yaml`, the weight
    files (STATUS line) and `benchmark_jsons` (`hf-dream bench` output: paths, or dicts for which
    the source label is "benchmark <i>"), whose results table is generated, never typed.

    `extra`: `repo_id` (default `hf-dream/<folder name>`), `license`, `base_model`, `tags`
    (added to the default tags), and any template variable to override.
    """
    folder = Path(drafter_dir)
    config_dict = json.loads((folder / "config.json").read_text())
    config = DreamConfig.from_dict({k: v for k, v in config_dict.items() if k not in ("auto_map",)})
    record = read_target_record(folder)
    training = json.loads((folder / "training.json").read_text()) if (folder / "training.json").exists() else None

    base_model = extra.pop("base_model", None)
    # An offline reference target (`reference:<name>`) is what the drafter runs with; the Hub
    # metadata then names its public backbone (`base_model`), the card's text names the target.
    reference = (config.target_name_or_path or "").startswith("reference:")
    if reference and not base_model:
        base_model = expected_base_model(config.target_name_or_path)
    target = (config.target_name_or_path if reference else None) or base_model or config.target_name_or_path or (record or {}).get("repo_id")
    repo_id = extra.pop("repo_id", None) or f"hf-dream/{folder.resolve().name}"
    license_id = extra.pop("license", None) or (record or {}).get("license")
    parameters = drafter_parameter_count(config)

    target_config = target_config_from_dict(record["config"]) if record else None
    # the adapter family (e.g. "pixtral", a `llava` model type) where the target's config is known
    family = get_target_adapter(ConfigOnlyTarget(target_config)).family if target_config is not None else config.target_model_type
    tags = list(dict.fromkeys([*BASE_TAGS, *([family] if family else []), *extra.pop("tags", [])]))

    weights = weight_files(folder)
    if weights:
        names = ", ".join(p.name for p in weights)
        status = f"trained weights included ({names})" if training else (
            f"weights included ({names}), but no training.json records how they were trained"
        )
    else:
        status = (
            f"{NO_WEIGHTS_STATUS}. `DreamDraftModel.from_pretrained` on this repository fails until trained "
            "weights are uploaded; the recipe below produces them."
        )

    target_params = target_parameter_count(target_config) if target_config is not None else None
    estimate = None
    if training is None and record is not None and target_params is not None:
        estimate = training_estimate(config, parameters, target_params, int(record["image_tokens"]["typical"]))
    plan = planned_recipe(target or "<target>", folder.resolve().name, estimate["prepare_batch_size"] if estimate else 8)
    train_yaml = (folder / "train.yaml").read_text() if (folder / "train.yaml").exists() else plan["train_yaml"]

    results = []
    for index, item in enumerate(benchmark_jsons):
        if isinstance(item, dict):
            results.append(benchmark_section(item, f"benchmark {index + 1}", target))
        else:
            results.append(benchmark_section(json.loads(Path(item).read_text()), Path(item).name, target))

    training_rows, training_command = None, None
    if training:
        training_command = training.get("command")
        order = ["data", "steps", "hardware", "wall_time", "date", "datasets", "notes"]
        keys = [k for k in order if k in training] + sorted(k for k in training if k not in order and k != "command")
        training_rows = {k: ", ".join(map(str, v)) if isinstance(v, list) else v for k, v in ((k, training[k]) for k in keys)}

    sources = [name for name in ("config.json", "target_config.json", "training.json", "train.yaml") if (folder / name).exists()]
    sources += [p.name for p in weights] + (["benchmark JSON"] if results else [])
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=base_model if reference and base_model else (target if _is_repo_id(target) else None),
        pipeline_tag=PIPELINE_TAG,
        tags=tags,
        license=license_id,
        datasets=(training or {}).get("datasets"),
    )
    template_kwargs = {
        "generator": "hf-dream card",
        "sources": ", ".join(sources),
        "title": f"DREAM drafter for {target}",
        "status": status,
        "target": target,
        "reference_target": target.split(":", 1)[1] if reference else None,
        "target_url": f"https://huggingface.co/{target}" if _is_repo_id(target) else "#",
        "target_family": family,
        "repo_id": repo_id,
        "remote_code": exported_code_files(folder, config_dict),
        "arch": _architecture(config, parameters),
        "target_parameters_text": f"{target_params:,} ({_count(target_params)})" if target_params else None,
        "target_provenance": f"{record['provenance']} Source: {record['source']}" if record else None,
        "training": training_rows,
        "training_command": training_command,
        "plan": plan,
        "train_yaml": train_yaml.rstrip("\n"),
        "estimate": estimate,
        "results": results,
        "license": license_id,
    }
    template_kwargs.update(extra)
    card = ModelCard.from_template(card_data, template_str=card_template(), **template_kwargs)
    # The Hub renders Markdown; runs of blank lines left by template blocks carry nothing.
    return ModelCard(re.sub(r"\n{3,}", "\n\n", str(card)).rstrip("\n") + "\n")


def validate_card(card: ModelCard | str, online: bool = False) -> dict:
    """Check a drafter card's metadata; returns it, or raises [`CardValidationError`].

    Offline (default): the YAML block parses to a mapping, the keys hf-dream requires are present,
    `base_model` is a valid repo id, `library_name`/`pipeline_tag`/tags are hf-dream's, a license
    of `other` names its license. `online=True` also asks the Hub (`ModelCard.validate`, which
    needs network).
    """
    import yaml

    text = str(card)
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.DOTALL)
    if not match:
        raise CardValidationError("The card has no YAML metadata block at its top.")
    try:
        metadata = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        raise CardValidationError(f"The card's YAML metadata does not parse: {error}") from None
    if not isinstance(metadata, dict):
        raise CardValidationError("The card's YAML metadata is not a mapping.")
    problems = [f"missing metadata `{key}`" for key in REQUIRED_CARD_KEYS if not metadata.get(key)]
    if metadata.get("base_model") and not _is_repo_id(str(metadata["base_model"])):
        problems.append(f"`base_model` {metadata['base_model']!r} is not a Hub repo id")
    if metadata.get("library_name") and metadata["library_name"] != LIBRARY_NAME:
        problems.append(f"`library_name` is {metadata['library_name']!r}, expected {LIBRARY_NAME!r}")
    if metadata.get("pipeline_tag") and metadata["pipeline_tag"] != PIPELINE_TAG:
        problems.append(f"`pipeline_tag` is {metadata['pipeline_tag']!r}, expected {PIPELINE_TAG!r}")
    missing_tags = [tag for tag in BASE_TAGS if tag not in (metadata.get("tags") or [])]
    if missing_tags:
        problems.append(f"tags {missing_tags} missing")
    license_id = metadata.get("license")
    if license_id is not None and (not isinstance(license_id, str) or not re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", license_id)):
        problems.append(f"`license` {license_id!r} is not a Hub license identifier")
    if license_id == "other" and not (metadata.get("license_name") and metadata.get("license_link")):
        problems.append("`license: other` needs `license_name` and `license_link`")
    if problems:
        raise CardValidationError("Invalid model card metadata: " + "; ".join(problems))
    if online:
        ModelCard(text).validate()
    return metadata
