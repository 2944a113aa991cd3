"""`llmtp serve`'s HTTP API, driven by the official openai client (unmodified) and by raw httpx
for what a client library would not send; greedy text compared with `llmtp generate`'s."""

import concurrent.futures
import json
import time

import httpx
import openai
import pytest

from llmtp.common.formats.chat_template import BUILTIN_TEMPLATES, ChatMessage, encode_chat
from llmtp.common.formats.checkpoint import load_checkpoint
from llmtp.common.formats.tokenizer import load_tokenizer
from llmtp.common.model.sampler import Sampler, SamplerConfig
from llmtp.coordinator.commands.engines import DEFAULT_MODEL_DIR
from llmtp.coordinator.generate import generate
from llmtp.coordinator.local_engine import LocalEngine

from cli_runner import run_llmtp
from serve_tools import DEADLINE_S, BackgroundServer, GatedEngine

API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def model():
    checkpoint = load_checkpoint(DEFAULT_MODEL_DIR / "model.bin")
    return checkpoint, load_tokenizer(DEFAULT_MODEL_DIR / "tokenizer.model", checkpoint.config.vocab_size)


@pytest.fixture(scope="module")
def server(model):
    checkpoint, tokenizer = model
    running = BackgroundServer(LocalEngine(checkpoint.config, checkpoint.weights, n_slots=4), tokenizer,
                               api_key=API_KEY, max_body_bytes=64 * 1024).start()
    yield running
    running.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=DEADLINE_S)


def http(server, method, path, key=API_KEY, headers=(), **kwargs):
    headers = dict(headers, **({"Authorization": f"Bearer {key}"} if key else {}))
    return httpx.request(method, server.base_url + path, headers=headers, timeout=DEADLINE_S, **kwargs)


def greedy_text(model, prompt_ids, max_tokens):
    """generate()'s new text for `max_tokens` tokens, as it follows the prompt's last token."""
    checkpoint, tokenizer = model
    engine = LocalEngine(checkpoint.config, checkpoint.weights)
    steps = min(len(prompt_ids) + max_tokens - 1, checkpoint.config.seq_len)
    ids = generate(engine, Sampler(SamplerConfig(temperature=0.0)), prompt_ids, steps).generated_ids
    before = tokenizer.decode(prompt_ids[-1:])
    return tokenizer.decode(prompt_ids[-1:] + ids)[len(before):], len(ids)


def test_completion_equals_llmtp_generate(model, client):
    _, tokenizer = model
    response = client.completions.create(model="whatever-name", prompt="ROMEO:", max_tokens=24, temperature=0)
    prompt_ids = tokenizer.encode("ROMEO:")
    expected, n_tokens = greedy_text(model, prompt_ids, 24)
    assert response.choices[0].text == expected
    assert response.choices[0].finish_reason == "length"
    assert response.usage.prompt_tokens == len(prompt_ids) and response.usage.completion_tokens == n_tokens == 24
    cli = run_llmtp("generate", "-t", "0", "-i", "ROMEO:", "-n", len(prompt_ids) + 23)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == "ROMEO:" + expected + "\n"


def test_streamed_chat_completion_equals_generate_on_the_rendered_prompt(model, client):
    _, tokenizer = model
    messages = [{"role": "system", "content": "Speak in verse."}, {"role": "user", "content": "Who goes there?"}]
    stream = client.chat.completions.create(model="x", messages=messages, stream=True, temperature=0, max_tokens=30,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    prompt_ids = encode_chat(tokenizer, BUILTIN_TEMPLATES["llama2"], [ChatMessage(**m) for m in messages])
    expected, n_tokens = greedy_text(model, prompt_ids, 30)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == n_tokens and chunks[-1].usage.prompt_tokens == len(prompt_ids)


def test_whole_chat_completion_and_stream_agree(client):
    messages = [{"role": "user", "content": "Good morrow"}]
    whole = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=12)
    streamed = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=12, stream=True)
    assert whole.choices[0].message.content == "".join(c.choices[0].delta.content or "" for c in streamed)
    assert whole.object == "chat.completion" and whole.usage.completion_tokens <= 12


def test_stop_strings_and_seeded_sampling(client):
    full = client.completions.create(model="x", prompt="KING", max_tokens=20, temperature=0).choices[0].text
    stop = full[8:11]
    cut = client.completions.create(model="x", prompt="KING", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    seeded = [client.completions.create(model="x", prompt="KING", max_tokens=15, temperature=0.9, top_p=0.9,
                                        seed=42, extra_body={"top_k": 40}).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["test-model"]
    assert http(server, "GET", "/health", key=None).json()["status"] == "ok"
    metrics = http(server, "GET", "/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert "# TYPE llmtp_completion_tokens_total counter" in metrics.text
    assert "llmtp_slots 4" in metrics.text


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a", "temperature": 5}, "temperature"),
    ({"prompt": "a", "top_p": "high"}, "top_p"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "max_tokens": True}, "max_tokens"),
    ({"prompt": "a", "n": 2}, "n"),
    ({"prompt": "a", "stop": [1, 2]}, "stop"),
    ({"prompt": "a", "seed": 1.5}, "seed"),
    ({"prompt": {"a": 1}}, "prompt"),
    ({"prompt": [5, 99999]}, "prompt"),
])
def test_bad_fields_are_400_naming_the_field(server, body, param):
    response = http(server, "POST", "/v1/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_bad_chat_messages_are_400(client):
    with pytest.raises(openai.BadRequestError, match="messages\\[0\\].role"):
        client.chat.completions.create(model="x", messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="system message must come first"):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "a"},
                                                            {"role": "system", "content": "b"}])


def test_too_long_prompt_is_400_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="x", prompt="word " * 2000, max_tokens=5)
    assert raised.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as raised:  # refused before tokenizing: too many characters
        client.completions.create(model="x", prompt="x" * 60_000, max_tokens=5)
    assert raised.value.code == "context_length_exceeded"


def test_wrong_or_missing_api_key_is_401(server):
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="x", prompt="a", max_tokens=2)
    assert http(server, "GET", "/v1/models", key=None).status_code == 401


def test_routes_bodies_and_json_errors(server):
    missing = http(server, "GET", "/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert http(server, "GET", "/v1/completions").status_code == 405
    huge = http(server, "POST", "/v1/completions", content=b"{" + b" " * 70_000 + b"}",
                headers={"Content-Type": "application/json"})
    assert huge.status_code == 413 and "limit" in huge.json()["error"]["message"]
    for garbage in (b"{not json", b"\xff\xfe", b"[1, 2]", b"[" * 100_000):
        response = http(server, "POST", "/v1/chat/completions", content=garbage)
        assert response.status_code in (400, 413) and "error" in response.json()


def test_client_disconnect_cancels_and_frees_the_slot(server, model):
    with httpx.stream("POST", server.base_url + "/v1/completions", timeout=DEADLINE_S,
                      headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"prompt": "O", "max_tokens": 10_000, "temperature": 0, "stream": True}) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ") and json.loads(first[6:])["object"] == "text_completion"
    deadline = time.monotonic() + DEADLINE_S
    while server.scheduler.metrics.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.scheduler.metrics.running == 0
    assert server.scheduler.metrics.cancelled >= 1


def test_no_free_slot_in_time_is_503_with_retry_after(model):
    checkpoint, tokenizer = model
    engine = GatedEngine(LocalEngine(checkpoint.config, checkpoint.weights, n_slots=1))
    server = BackgroundServer(engine, tokenizer, queue_timeout=0.0).start()
    try:
        engine.permits.release(1)  # the holder's prefill: its first token sends the response headers
        with httpx.stream("POST", server.base_url + "/v1/completions", timeout=DEADLINE_S,
                          json={"prompt": "O", "max_tokens": 100, "temperature": 0, "stream": True}) as holder:
            lines = holder.iter_lines()  # kept: a dropped line iterator closes the response
            assert next(lines).startswith("data: ")
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                refused = pool.submit(httpx.post, server.base_url + "/v1/completions", timeout=DEADLINE_S,
                                      json={"prompt": "O", "max_tokens": 2})
                deadline = time.monotonic() + DEADLINE_S
                while server.scheduler._inbox.qsize() == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)  # until the request is queued; the scheduler is held inside a step
                engine.permits.release(1)  # it comes round with the one slot still taken
                refused = refused.result(DEADLINE_S)
            engine.permits.release(10_000)
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["type"] == "server_error"
        later = httpx.post(server.base_url + "/v1/completions", timeout=DEADLINE_S,
                           json={"prompt": "O", "max_tokens": 4, "temperature": 0})
        assert later.status_code == 200 and later.json()["usage"]["completion_tokens"] == 4
    finally:
        engine.permits.release(10_000)
        server.stop()
