"""Regeneration through an OpenAI-compatible server, against an in-process fake server (httpx.MockTransport):
retries with backoff, refusals, concurrency, and `prepare_dataset(server=...)` resuming by shard like local
regeneration. The real server (hf-dream serve on the reference target) is in tests/test_serving.py."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
from conftest import cached_target

httpx = pytest.importorskip("httpx")

from hf_dream.testing import build_tiny_tokenizer, make_tiny_inputs  # noqa: E402
from hf_dream.training import prepare_dataset  # noqa: E402
from hf_dream.training.data import recorded_settings  # noqa: E402
from hf_dream.training.remote import ChatServerClient, ServerRegeneration, ServerRequestError, ServerSettings  # noqa: E402


class FakeServer:
    """Answers /v1/models and /v1/chat/completions; `failures` lists the statuses (or "drop" for a lost connection)
    that the next chat requests get before it answers again."""

    def __init__(self, models=("served",), failures=(), answer=None):
        self.models, self.failures, self.requests = list(models), list(failures), []
        self.answer = answer or (lambda body: ("abc" * body["max_tokens"])[: body["max_tokens"]])
        self.lock, self.in_flight, self.most_in_flight = threading.Lock(), 0, 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": name} for name in self.models]})
        body = json.loads(request.content)
        with self.lock:
            self.requests.append(body)
            failure = self.failures.pop(0) if self.failures else None
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if failure == "drop":
                raise httpx.ConnectError("connection refused", request=request)
            if failure is not None:
                status, headers = failure if isinstance(failure, tuple) else (failure, {})
                return httpx.Response(status, headers=headers, json={"error": {"message": f"status {status}"}})
            if body["model"] not in self.models:
                return httpx.Response(404, json={"error": {"message": f"no model {body['model']}"}})
            text = self.answer(body)
            finish = "length" if len(text) >= body["max_tokens"] else "stop"
            return httpx.Response(
                200, json={"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]}
            )
        finally:
            with self.lock:
                self.in_flight -= 1


def client_for(server: FakeServer, sleeps: list | None = None, **settings) -> ChatServerClient:
    options = dict(url="http://fake:8000", max_retries=3, backoff_seconds=1.0)
    return ChatServerClient(
        ServerSettings(**{**options, **settings}),
        transport=httpx.MockTransport(server),
        sleep=(sleeps.append if sleeps is not None else lambda seconds: None),
    )


MESSAGES = [{"role": "user", "content": "hi"}]


def test_transient_errors_are_retried_with_exponential_backoff_and_retry_after():
    sleeps = []
    server = FakeServer(failures=[503, "drop", (429, {"retry-after": "7"})])
    response = client_for(server, sleeps).complete(MESSAGES, max_tokens=4)
    assert response.text == "abca" and response.finish_reason == "length"
    assert len(server.requests) == 4
    assert 1.0 <= sleeps[0] <= 1.1 and 2.0 <= sleeps[1] <= 2.2 and sleeps[2] == 7.0  # 1 s, 2 s, then the server's Retry-After


def test_refusals_and_exhausted_retries_are_errors_naming_the_server_answer():
    server = FakeServer(failures=[400])
    with pytest.raises(ServerRequestError, match=r"chat/completions was refused \(HTTP 400: .*status 400"):
        client_for(server).complete(MESSAGES, max_tokens=4)
    assert len(server.requests) == 1  # a bad request is not retried
    with pytest.raises(ServerRequestError, match="failed 4 times; last: HTTP 502"):
        client_for(FakeServer(failures=[502] * 4)).complete(MESSAGES, max_tokens=4)
    with pytest.raises(ServerRequestError, match=r"refused \(HTTP 404: .*no model other"):
        client_for(FakeServer(), model="other").complete(MESSAGES, max_tokens=4)


def test_the_model_name_comes_from_the_server_when_it_serves_one():
    assert client_for(FakeServer(models=["org/vlm-7b"])).model == "org/vlm-7b"
    with pytest.raises(ServerRequestError, match="serves 2 models .*a, b.*name one with --model"):
        client_for(FakeServer(models=["a", "b"])).model  # noqa: B018
    with pytest.raises(ValueError, match="give the server's base URL"):
        ServerSettings(url="localhost:8000")
    assert ServerSettings(url="http://h:1/").api_base == ServerSettings(url="http://h:1/v1").api_base == "http://h:1/v1"


def test_requests_run_concurrently_and_answers_keep_their_order():
    import time

    def slow_echo(body):
        time.sleep(0.05)
        return body["messages"][0]["content"]

    server = FakeServer(answer=slow_echo)
    conversations = [[{"role": "user", "content": f"q{i}"}] for i in range(12)]
    answers = client_for(server, concurrency=4).complete_all(conversations, max_tokens=50)
    assert [answer.text for answer in answers] == [f"q{i}" for i in range(12)]
    assert server.most_in_flight == 4


# --- prepare_dataset through a server ---------------------------------------------------------------
EXAMPLES = [{"seed": i, "prompt": f"prompt {i}"} for i in range(6)]


def regeneration(server: FakeServer, tokenizer, **settings) -> ServerRegeneration:
    return ServerRegeneration(
        client_for(server, **settings),
        lambda example: [{"role": "user", "content": example["prompt"]}],
        tokenizer,
        eos_token_id=2,
    )


def answer_by_prompt(body):
    number = int(body["messages"][0]["content"].split()[-1])
    return "xyzw"[: number % 4 + 1] if number != 5 else "abcdefgh"  # prompt 5 runs into max_tokens


def run(target, folder, server, **kwargs):
    return prepare_dataset(
        target,
        EXAMPLES,
        lambda example: make_tiny_inputs(target, seed=example["seed"]),
        folder,
        max_new_tokens=6,
        shard_size=2,
        show_progress=False,
        server=server,
        target_spec="tiny:llava",
        **kwargs,
    )


def test_server_regeneration_rows_resume_by_shard_and_record_the_server(tmp_path):
    target = cached_target("llava")
    tokenizer = build_tiny_tokenizer(target)
    whole = run(target, tmp_path / "whole", regeneration(FakeServer(answer=answer_by_prompt), tokenizer))
    for row in whole:
        prompt = make_tiny_inputs(target, seed=row["source_index"])["input_ids"][0].tolist()
        text = answer_by_prompt({"messages": [{"content": f"prompt {row['source_index']}"}]})
        response = tokenizer(text, add_special_tokens=False)["input_ids"]
        # finish_reason "stop": the target's EOS ends the row, as in local regeneration; "length": cut at max_new_tokens
        assert row["input_ids"] == prompt + (response[:6] if row["source_index"] == 5 else response + [2])
        assert row["prompt_length"] == len(prompt)

    # a server that goes away in the middle of shard 1 (after a retry): shard 0 is kept, the run fails loudly
    folder = tmp_path / "resumed"
    dying = FakeServer(answer=answer_by_prompt, failures=[None, None, 503, "drop", 503, 503])
    with pytest.raises(ServerRequestError, match="failed"):
        run(target, folder, regeneration(dying, tokenizer, concurrency=1, max_retries=1))
    assert sorted(path.name for path in (folder / "shards").iterdir() if not path.name.startswith(".")) == ["00000"]
    server = FakeServer(answer=answer_by_prompt)
    resumed = run(target, folder, regeneration(server, tokenizer))
    assert len(server.requests) == 4  # shards 1 and 2 only
    assert resumed["input_ids"] == whole["input_ids"] and resumed["source_index"] == list(range(6))

    settings = recorded_settings(folder)
    assert settings["server"] == {"model": "served"} and settings["server_url"] == "http://fake:8000/v1"
    assert "weights_fingerprint" not in settings["target"]  # the weights that answered are the server's
    shutil.rmtree(folder / "shards" / "00002")
    with pytest.raises(
        ValueError,
        match="regenerated through the server's model 'served', this run regenerates through the server's model 'other'",
    ):
        run(target, folder, regeneration(FakeServer(models=["other"], answer=answer_by_prompt), tokenizer))
    with pytest.raises(ValueError, match="regenerated through the server's model 'served', this run regenerates locally"):
        run(target, folder, None)  # resuming a server run with local generation would mix two runs
    # another URL for the same model (the server moved) resumes
    moved = regeneration(FakeServer(answer=answer_by_prompt), tokenizer, url="http://elsewhere:9000/v1")
    assert run(target, folder, moved)["input_ids"] == whole["input_ids"]
