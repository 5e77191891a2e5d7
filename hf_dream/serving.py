"""`hf-dream serve`: transformers' own OpenAI-compatible server (`transformers serve`) with a DREAM drafter.

transformers 5.24 ships the server behind `transformers serve` (`transformers.cli.serving`: a FastAPI app
from `build_server`, a `ModelManager` that loads and caches models, per-endpoint handlers, and a
`GenerationState` whose `GenerateManager` runs `model.generate()` on one inference thread per model). We
compose those pieces instead of writing a server, and change four of them by subclassing:

- [`PreloadedModelManager`]: the target is loaded by hf-dream (any target spec, reference targets included)
  and pinned under one model name; a request for another model is answered with transformers' own 400.
- [`DreamGenerateManager`]: hands `generate()` a [`DraftingTarget`], which adds `assistant_model=drafter`
  (or the tree loop) to every call and records the call's decoding statistics, for that request only.
- [`DreamChatCompletionHandler`]: checks a request before any work (images load, options DREAM can honour,
  `n`/`logprobs`), answering a 400 that names the problem; `temperature > 0` samples (OpenAI's meaning);
  puts the statistics in the response (`dream_stats`, also on the last streamed chunk) and logs them.
- [`DreamGenerationState`]: one [`DreamGenerateManager`] per model; no continuous batching.

`transformers.cli.serving` is the command's implementation, not a documented library API: this module is the
only one that imports it, and the transformers pin in `pyproject.toml` covers it like the generate() hook.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from dataclasses import dataclass

from transformers.utils.import_utils import is_serve_available

if not is_serve_available():  # transformers' serving modules do not import without them
    raise ImportError('hf-dream serve needs FastAPI, uvicorn and openai: pip install "hf-dream[serve]"')

from transformers.cli.serving.chat_completion import ChatCompletionHandler  # noqa: E402
from transformers.cli.serving.model_manager import ModelManager, TimedModel  # noqa: E402
from transformers.cli.serving.utils import GenerateManager, GenerationState  # noqa: E402

logger = logging.getLogger("hf_dream.serving")


# OpenAI request fields a DREAM server refuses instead of ignoring (transformers' server only warns about them).
UNSERVABLE_FIELDS = {
    "n": lambda value: value not in (None, 1),
    "logprobs": lambda value: bool(value),
    "top_logprobs": lambda value: value not in (None, 0),
}


@dataclass
class RequestDecodingStats:
    """What the drafter did for one request (the scalar part of `drafter.last_stats`).

    `acceptance_length` is new tokens per target pass, bonus token and the prefill pass included."""

    target_passes: int
    drafted_tokens: int
    accepted_tokens: int
    new_tokens: int
    acceptance_length: float

    @classmethod
    def from_last_stats(cls, stats: dict) -> RequestDecodingStats:
        """The record of a `drafter.last_stats` read-out (chain or tree)."""
        return cls(**{field.name: stats[field.name] for field in dataclasses.fields(cls)})

    def as_dict(self) -> dict:
        """The JSON form sent as `dream_stats`."""
        return dataclasses.asdict(self)


@dataclass
class DraftingSettings:
    """How the server drafts: `tree=True` uses the tree loop, `decoding_options` are `generate()` keywords
    (`num_draft_tokens`, `draft_schedule`, `tree_total_tokens`, ...; see `DreamDecodingOptions`)."""

    tree: bool = False
    decoding_options: dict = dataclasses.field(default_factory=dict)

    def generate_kwargs(self, drafter) -> dict:
        """The `generate()` keywords that draft with `drafter`."""
        if self.tree:
            from .generation import tree_generate

            return {"custom_generate": tree_generate, "drafter": drafter, **self.decoding_options}
        return {"assistant_model": drafter, **self.decoding_options}


class RequestStatsStore:
    """Decoding statistics by request id, written on the inference thread and read by the handler."""

    def __init__(self):
        self._stats: dict[str, RequestDecodingStats] = {}
        self._lock = threading.Lock()

    def put(self, request_id: str, stats: RequestDecodingStats) -> None:
        """Keep the statistics of request `request_id` (and log them, one line per request)."""
        with self._lock:
            self._stats[request_id] = stats
        logger.info("request %s: %s", request_id, json.dumps(stats.as_dict()))

    def pop(self, request_id: str) -> RequestDecodingStats | None:
        """Take the statistics of request `request_id` out (None if it recorded none)."""
        with self._lock:
            return self._stats.pop(request_id, None)


class _StatsBeforeEnd:
    """A streamer proxy that records the call's statistics just before the stream ends, so that the last
    streamed chunk (built once the stream has ended) can carry them."""

    def __init__(self, streamer, record):
        self._streamer, self._record = streamer, record

    def put(self, value) -> None:
        """Forward new tokens."""
        self._streamer.put(value)

    def end(self) -> None:
        """Record the statistics, then end the stream."""
        self._record()
        self._streamer.end()


class DraftingTarget:
    """The target as the generation manager sees it: `generate(**kwargs)` drafts with the DREAM drafter and
    records the call's statistics under `request_id`; every other attribute is the target's."""

    def __init__(self, target, drafter, settings: DraftingSettings, store: RequestStatsStore, request_id: str):
        self._target, self._drafter, self._settings = target, drafter, settings
        self._store, self._request_id = store, request_id

    def __getattr__(self, name):
        return getattr(self._target, name)

    def _record(self) -> None:
        if self._drafter.last_stats:
            self._store.put(self._request_id, RequestDecodingStats.from_last_stats(self._drafter.last_stats))

    def generate(self, **kwargs):
        """The target's `generate(**kwargs)`, drafting with the DREAM drafter."""
        self._drafter.last_stats = None
        # transformers' server passes the processor as `tokenizer`; stop strings need the tokenizer inside it
        if kwargs.get("tokenizer") is not None:
            kwargs["tokenizer"] = getattr(kwargs["tokenizer"], "tokenizer", kwargs["tokenizer"])
        if kwargs.get("streamer") is not None:
            kwargs["streamer"] = _StatsBeforeEnd(kwargs["streamer"], self._record)
        output = self._target.generate(**kwargs, **self._settings.generate_kwargs(self._drafter))
        if kwargs.get("streamer") is None:
            self._record()
        return output


class DreamGenerateManager(GenerateManager):
    """transformers' sequential generation manager (one inference thread), drafting every call."""

    def __init__(self, drafter, settings: DraftingSettings, store: RequestStatsStore):
        super().__init__()
        self.drafter, self.settings, self.store = drafter, settings, store

    def _drafting(self, model, request_id: str) -> DraftingTarget:
        return DraftingTarget(model, self.drafter, self.settings, self.store, request_id)

    def generate_streaming(self, model, processor, inputs, gen_config, request_id, response_parser=None):
        return super().generate_streaming(
            self._drafting(model, request_id), processor, inputs, gen_config, request_id, response_parser
        )

    async def generate_non_streaming(self, model, processor, inputs, gen_config, request_id):
        return await super().generate_non_streaming(self._drafting(model, request_id), processor, inputs, gen_config, request_id)


class DreamGenerationState(GenerationState):
    """Every model of this server decodes through a [`DreamGenerateManager`] (no continuous batching)."""

    def __init__(self, drafter, settings: DraftingSettings, store: RequestStatsStore):
        super().__init__(continuous_batching=False)
        self.drafter, self.settings, self.store = drafter, settings, store

    def get_manager(self, model_id: str, use_cb: bool = False):
        if model_id not in self._generate_managers:
            self._generate_managers[model_id] = DreamGenerateManager(self.drafter, self.settings, self.store)
        return self._generate_managers[model_id]


class PreloadedModelManager(ModelManager):
    """A model manager pinned to one target that hf-dream loaded, served under `model_name`."""

    def __init__(self, target, processor, model_name: str):
        super().__init__(device=str(target.device), force_model=None)
        self.force_model, self.model_timeout = model_name, -1  # pinned, never unloaded
        self.loaded_models[model_name] = TimedModel(target, timeout_seconds=-1, processor=processor)

    def process_model_name(self, model_id: str) -> str:
        """The pinned name as given (transformers would append '@main', a Hub revision, to a name like 'reference:x')."""
        return model_id if model_id == self.force_model else super().process_model_name(model_id)


def _bad_request(message: str):
    from fastapi import HTTPException

    return HTTPException(status_code=400, detail=message)


def check_request_images(messages) -> None:
    """Load every image of an OpenAI `messages` list (data URL, file path or URL) so that a missing file or
    bad base64 is a 400 naming the message and part, before the target runs."""
    from transformers.image_utils import load_image

    if not isinstance(messages, list) or not messages:
        raise _bad_request("`messages` must be a non-empty list of chat messages.")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise _bad_request(f"messages[{index}] must be an object with a `role` and a `content`.")
        content = message.get("content")
        for part_index, part in enumerate(content if isinstance(content, list) else []):
            if not isinstance(part, dict) or part.get("type") not in ("image_url", "input_image"):
                continue
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            where = f"messages[{index}].content[{part_index}]"
            if not isinstance(url, str) or not url:
                raise _bad_request(f"{where}: an image part needs `image_url.url` (a data URL, a file path or a URL).")
            shown = url if len(url) <= 80 else url[:77] + "..."
            if (
                not url.startswith(("data:", "http://", "https://"))
                and ("/" in url or "." in url[-5:])
                and not os.path.isfile(url)
            ):
                raise _bad_request(f"{where}: no such image file on the server: {shown!r} (send the image inline as a data URL)")
            try:
                load_image(url).load()
            except Exception as error:  # noqa: BLE001  (PIL, base64 and OS errors all mean: unusable image)
                raise _bad_request(f"{where}: cannot load the image {shown!r}: {' '.join(str(error).split())[:300]}") from None


class DreamChatCompletionHandler(ChatCompletionHandler):
    """`/v1/chat/completions` with the request checked before any work and the drafter's statistics returned."""

    def __init__(self, *args, target, drafter, store: RequestStatsStore, **kwargs):
        super().__init__(*args, **kwargs)
        self.target, self.drafter, self.store = target, drafter, store

    async def handle_request(self, body: dict, request_id: str):
        for name, unservable in UNSERVABLE_FIELDS.items():
            if unservable(body.get(name)):
                raise _bad_request(
                    f"`{name}={body[name]!r}` is not supported with a DREAM drafter (one greedy or sampled answer per request)."
                )
        self._resolve_model(dict(body))  # an unknown model: transformers' own 400, before the images are read
        check_request_images(body.get("messages"))
        return await super().handle_request(body, request_id)

    def _build_generation_config(self, body: dict, model_generation_config, use_cb: bool = False):
        from .generation.hook import validate_dream_generation

        generation_config = super()._build_generation_config(body, model_generation_config, use_cb=use_cb)
        if body.get("temperature") is not None and float(body["temperature"]) > 0:
            generation_config.do_sample = True  # OpenAI's meaning; transformers' server keeps the model's default
        try:
            generation_config.validate()
            mode = generation_config.get_generation_mode(self.drafter)
            validate_dream_generation(self.target, self.drafter, mode, generation_config)
        except ValueError as error:
            raise _bad_request(f"This request cannot be decoded with the DREAM drafter: {error}") from None
        return generation_config

    def _build_completion(self, request_id: str, *args, **kwargs) -> dict:
        completion = super()._build_completion(request_id, *args, **kwargs)
        stats = self.store.pop(request_id)
        if stats is not None:
            completion["dream_stats"] = stats.as_dict()
        return completion

    def _build_chunk_sse(self, request_id: str = "", *args, finish_reason: str | None = None, **kwargs) -> str:
        sse = super()._build_chunk_sse(request_id, *args, finish_reason=finish_reason, **kwargs)
        stats = self.store.pop(request_id) if finish_reason is not None else None
        if stats is None:
            return sse
        chunk = json.loads(sse.removeprefix("data: "))
        chunk["dream_stats"] = stats.as_dict()
        return f"data: {json.dumps(chunk)}\n\n"


def build_dream_app(target, processor, drafter, model_name: str, settings: DraftingSettings | None = None):
    """transformers' FastAPI app (`build_server`) serving `target` as `model_name`, drafting with `drafter`."""
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler

    from .generation.validation import check_dream_call

    if processor is None:
        raise ValueError("hf-dream serve needs a target with a processor (tokenizer and chat template); tiny targets have none.")
    settings = settings or DraftingSettings()
    # a drafter for another target, on another device, ...: refused before the server starts
    check_dream_call(target, drafter, target.generation_config, usage="`hf-dream serve --drafter DIR`")
    store = RequestStatsStore()
    models = PreloadedModelManager(target, processor, model_name)
    generation = DreamGenerationState(drafter, settings, store)
    chat = DreamChatCompletionHandler(
        model_manager=models, generation_state=generation, target=target, drafter=drafter, store=store
    )
    app = build_server(
        models,
        chat,
        completion_handler=CompletionHandler(model_manager=models, generation_state=generation),
        response_handler=ResponseHandler(model_manager=models, generation_state=generation),
        transcription_handler=TranscriptionHandler(models, generation),
        systemone_handler=SystemOneHandler(model_manager=models, generation_state=generation),
        generation_state=generation,
    )
    _answer_errors_with_messages(app)
    return app


def _answer_errors_with_messages(app) -> None:
    """Errors in OpenAI's shape, `{"error": {"message": ...}}`, which OpenAI clients show (FastAPI's `{"detail": ...}`
    they do not); an error inside generate() is a 500 whose message says what went wrong."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def error_response(status: int, message: str) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.exception_handler(HTTPException)
    async def _http_error(_request, error: HTTPException):
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def _internal_error(_request, error: Exception):
        logger.error("request failed: %s: %s", type(error).__name__, error)
        return error_response(500, f"{type(error).__name__}: {error}")


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Run `app` with uvicorn until interrupted."""
    import uvicorn

    if not logger.handlers:  # one line per request with its decoding statistics
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s hf-dream serve: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()
