"""Regeneration through an OpenAI-compatible chat endpoint (vLLM, SGLang, TGI, `transformers serve`, `hf-dream serve`).

The server answers text: the response is tokenized here with the target's own tokenizer
(`add_special_tokens=False`) and, when the server reports `finish_reason == "stop"`, the target's EOS token is
appended, which is how a local regeneration's row ends. The prompt side of each row (token ids and image
tensors) is made locally by the target's processor, exactly as for local regeneration, so a row depends on the
server only through the response text. Re-tokenizing a decoded text gives the generated ids back whenever the
model generated the canonical tokenization of its text, which greedy decoding almost always does (tested: local
and server regeneration give the same rows at T=0 on the reference target).
"""

from __future__ import annotations

import base64
import io
import mimetypes
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# HTTP statuses worth retrying: timeouts, rate limits, an overloaded or restarting server.
TRANSIENT_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class ServerRequestError(RuntimeError):
    """The server refused a request for good (a non-transient status), or kept failing after every retry."""


@dataclass
class ServerSettings:
    """How to reach the server: `url` is its base URL (with or without `/v1`), `model` the name it serves
    (None: the one model `/v1/models` lists); `concurrency` requests in flight; a transient failure is retried
    `max_retries` times, waiting `backoff_seconds * 2**attempt` (or the server's `Retry-After`), at most `max_backoff_seconds`."""

    url: str
    model: str | None = None
    concurrency: int = 8
    max_retries: int = 5
    backoff_seconds: float = 1.0
    max_backoff_seconds: float = 60.0
    timeout_seconds: float = 600.0
    api_key: str | None = None

    def __post_init__(self):
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--server {self.url!r}: give the server's base URL, e.g. http://127.0.0.1:8000/v1")
        for name in ("concurrency", "timeout_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"server {name} must be positive, got {getattr(self, name)}")
        if self.max_retries < 0 or self.backoff_seconds < 0:
            raise ValueError("server max_retries and backoff_seconds must not be negative")

    @property
    def api_base(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/v1") else base + "/v1"


@dataclass
class ServerResponse:
    """One chat completion: its text and why it ended (`stop`: an end-of-sequence token, `length`: max_tokens)."""

    text: str
    finish_reason: str


class ChatServerClient:
    """A thread-safe client of `/v1/chat/completions` with retries and backoff. `transport` is an httpx
    transport (tests pass `httpx.MockTransport`); `sleep` waits between attempts."""

    def __init__(self, settings: ServerSettings, transport=None, sleep: Callable[[float], None] = time.sleep):
        try:
            import httpx
        except ImportError:
            raise ImportError('Regeneration through a server needs httpx: pip install "hf-dream[serve]"') from None

        self.settings, self._sleep = settings, sleep
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._http = httpx.Client(
            base_url=settings.api_base, timeout=settings.timeout_seconds, transport=transport, headers=headers
        )
        self._model = settings.model

    @property
    def model(self) -> str:
        """The served model's name: `settings.model`, or the only one the server lists."""
        if self._model is None:
            listed = [entry["id"] for entry in self._request("GET", "/models").get("data", [])]
            if len(listed) != 1:
                raise ServerRequestError(
                    f"{self.settings.api_base} serves {len(listed)} models ({', '.join(listed) or 'none'}): name one with --model"
                )
            self._model = listed[0]
        return self._model

    def complete(self, messages: list[dict], max_tokens: int, temperature: float = 0.0) -> ServerResponse:
        """One chat completion of `messages` (retried on transient errors)."""
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        answer = self._request("POST", "/chat/completions", json=body)
        try:
            choice = answer["choices"][0]
            return ServerResponse(text=choice["message"]["content"] or "", finish_reason=choice.get("finish_reason") or "stop")
        except (KeyError, IndexError, TypeError):
            raise ServerRequestError(f"{self.settings.api_base}: not a chat completion: {str(answer)[:300]}") from None

    def complete_all(self, conversations: list[list[dict]], max_tokens: int, temperature: float = 0.0) -> list[ServerResponse]:
        """Responses in the order of `conversations`, with up to `concurrency` requests in flight."""
        self.model  # noqa: B018  (resolve the name once, before the threads start)
        with ThreadPoolExecutor(self.settings.concurrency) as pool:
            return list(pool.map(lambda messages: self.complete(messages, max_tokens, temperature), conversations))

    def _request(self, method: str, path: str, **kwargs) -> dict:
        import httpx

        where = f"{method} {self.settings.api_base}{path}"
        for attempt in range(self.settings.max_retries + 1):
            retry_after = None
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as error:  # refused, reset, timed out: the server may be restarting
                problem = f"{type(error).__name__}: {error}"
            else:
                if response.status_code < 400:
                    return response.json()
                problem = f"HTTP {response.status_code}: {response.text[:500]}"
                if response.status_code not in TRANSIENT_STATUSES:
                    raise ServerRequestError(f"{where} was refused ({problem})")
                retry_after = _seconds(response.headers.get("retry-after"))
            if attempt == self.settings.max_retries:
                raise ServerRequestError(f"{where} failed {attempt + 1} times; last: {problem}")
            wait = (
                self.settings.backoff_seconds * 2**attempt * (1 + 0.1 * random.random()) if retry_after is None else retry_after
            )
            self._sleep(min(wait, self.settings.max_backoff_seconds))
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def image_data_url(image) -> str:
    """An image as an inline data URL: a file's own bytes (PNG, JPEG, ... kept as they are, so the server decodes the
    very pixels the local processor sees), or a PIL image as PNG."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        data = path.read_bytes()
    else:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        mime, data = "image/png", buffer.getvalue()
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@dataclass
class ServerRegeneration:
    """What `prepare_dataset` needs to regenerate through a server: the client, how an example becomes chat
    messages, and the target's tokenizer and EOS id for turning response texts into token ids."""

    client: ChatServerClient
    to_messages: Callable[[dict], list[dict]]
    tokenizer: object
    eos_token_id: int | None

    def response_ids(self, examples: list[dict], max_new_tokens: int) -> list[list[int]]:
        """Greedy responses to `examples`, as the target's token ids (EOS appended where the server stopped on one)."""
        responses = self.client.complete_all([self.to_messages(example) for example in examples], max_new_tokens)
        ids = []
        for response in responses:
            tokens = self.tokenizer(response.text, add_special_tokens=False)["input_ids"]
            if response.finish_reason == "stop" and self.eos_token_id is not None:
                tokens = tokens + [self.eos_token_id]
            ids.append(tokens[:max_new_tokens])
        return ids

    def record(self) -> dict:
        """What settings.json records about the server (the model is compared on resume, the URL is not)."""
        return {"model": self.client.model}
