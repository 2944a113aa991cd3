"""`llmtp serve` under bad clients and a lost worker: 100 concurrent clients of which some hang up
mid-stream, some send garbage and some send huge bodies, after which every slot is free and a
greedy request gives generate's text; and a worker killed (SIGKILL) while four streams run on
--workers 2, after which every stream goes on to generate's text."""

import asyncio
import json
import os
import random
import signal
import time

import httpx
import pytest

from llmtp.common.formats.checkpoint import load_checkpoint
from llmtp.common.formats.tokenizer import load_tokenizer
from llmtp.coordinator.commands.engines import DEFAULT_MODEL_DIR
from llmtp.coordinator.local_engine import LocalEngine

from process_tools import worker_children_of
from serve_tools import DEADLINE_S, BackgroundServer
from test_serve_api import greedy_text
from test_serve_cli import start_serve, stop

PROMPTS = ["ROMEO:", "Now is the winter", "KING", "My lord, I"]
MAX_TOKENS = 8
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def model():
    checkpoint = load_checkpoint(DEFAULT_MODEL_DIR / "model.bin")
    return checkpoint, load_tokenizer(DEFAULT_MODEL_DIR / "tokenizer.model", checkpoint.config.vocab_size)


@pytest.fixture(scope="module")
def expected(model):
    _, tokenizer = model
    return {prompt: greedy_text(model, tokenizer.encode(prompt), MAX_TOKENS)[0] for prompt in PROMPTS}


async def good(client, prompt):
    response = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS,
                                                          "temperature": 0})
    assert response.status_code == 200, response.text
    return "good", prompt, response.json()["choices"][0]["text"]


async def hang_up(client, rng):
    """Streams, reads a few lines (maybe none), and goes away."""
    lines_to_read = rng.randrange(4)
    async with client.stream("POST", "/v1/completions", json={"prompt": rng.choice(PROMPTS), "max_tokens": 200,
                                                              "temperature": 0, "stream": True}) as response:
        read = 0
        async for _ in response.aiter_lines():
            read += 1
            if read >= lines_to_read:
                break
    return "hang_up", None, None


async def garbage(port, rng):
    """Bytes that are not HTTP, or HTTP whose body is not a request: a 4xx or a closed connection."""
    kind = rng.randrange(3)
    if kind == 0:
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2000)))
    elif kind == 1:
        body = bytes(rng.randrange(256) for _ in range(300))
        payload = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(body)) + body
    else:
        body = json.dumps({"messages": [{"role": "user", "content": ["not", "text"]}], "n": "many"}).encode()
        payload = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()  # no more is coming: an unfinished request ends here rather than waiting
        status_line = await asyncio.wait_for(reader.readline(), DEADLINE_S)
    except ConnectionError:
        status_line = b""
    finally:
        writer.close()
    if status_line:
        status = int(status_line.split()[1])
        assert 400 <= status < 500, status_line
    return "garbage", None, None


async def huge(client, rng):
    """Over the body limit: declared up front, or streamed without a length."""
    if rng.randrange(2):
        response = await client.post("/v1/completions", content=b"x" * (MAX_BODY * 8))
    else:
        async def chunks():
            for _ in range(64):
                yield b'{"prompt": "' + b"a" * 8192
        try:
            response = await client.post("/v1/completions", content=chunks())
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            return "huge", None, None  # the server answered 413 and closed while the body was still going
    assert response.status_code == 413, response.text
    return "huge", None, None


async def hundred_clients(base_url, port):
    rng = random.Random(16)
    kinds = ["good"] * 40 + ["hang_up"] * 30 + ["garbage"] * 15 + ["huge"] * 15
    rng.shuffle(kinds)
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=DEADLINE_S, limits=limits) as client:
        tasks = []
        for index, kind in enumerate(kinds):
            if kind == "good":
                tasks.append(good(client, PROMPTS[index % len(PROMPTS)]))
            elif kind == "hang_up":
                tasks.append(hang_up(client, random.Random(index)))
            elif kind == "garbage":
                tasks.append(garbage(port, random.Random(index)))
            else:
                tasks.append(huge(client, random.Random(index)))
        return await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE_S * 2)


def test_hundred_bad_and_good_clients_leave_every_slot_free_and_text_unchanged(model, expected):
    checkpoint, tokenizer = model
    server = BackgroundServer(LocalEngine(checkpoint.config, checkpoint.weights, n_slots=4), tokenizer,
                              max_body_bytes=MAX_BODY, queue_timeout=DEADLINE_S).start()
    try:
        results = asyncio.run(hundred_clients(server.base_url, server.port))
        for kind, prompt, text in results:
            if kind == "good":
                assert text == expected[prompt], prompt
        deadline = time.monotonic() + DEADLINE_S
        metrics = server.scheduler.metrics
        while (metrics.running or metrics.waiting) and time.monotonic() < deadline:
            time.sleep(0.05)
        health = httpx.get(server.base_url + "/health", timeout=DEADLINE_S).json()
        assert health == {"status": "ok", "slots": 4, "slots_busy": 0, "waiting": 0}
        assert metrics.cancelled >= 1
        after = httpx.post(server.base_url + "/v1/completions", timeout=DEADLINE_S,
                           json={"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0})
        assert after.json()["choices"][0]["text"] == expected[PROMPTS[0]]
    finally:
        server.stop()


def test_a_worker_killed_mid_stream_every_stream_goes_on_with_the_same_text(model):
    _, tokenizer = model
    n_tokens = 200
    want = {prompt: greedy_text(model, tokenizer.encode(prompt), n_tokens)[0] for prompt in PROMPTS}
    process, base = start_serve("--slots", len(PROMPTS), "-w", 2)
    try:
        workers = worker_children_of(process.pid)
        assert len(workers) == 2
        texts = asyncio.run(streams_with_a_kill(base, n_tokens, workers[1]))
    finally:
        stderr = stop(process)
    assert texts == want, stderr
    assert "recovering" in stderr and "rebuilding the caches" in stderr, stderr  # the kill landed mid-stream


async def streams_with_a_kill(base, n_tokens, victim):
    """Four greedy streams; once every one has a few tokens, one worker is killed."""
    started = asyncio.Event()
    have_tokens = {prompt: asyncio.Event() for prompt in PROMPTS}

    async def stream(client, prompt):
        text = ""
        async with client.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": n_tokens,
                                                                  "temperature": 0, "stream": True}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    text += chunk["choices"][0]["text"]
                    if len(text) > 3:
                        have_tokens[prompt].set()
                        if not started.is_set():
                            await started.wait()
        return prompt, text

    async def killer():
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in have_tokens.values())), DEADLINE_S)
        os.kill(victim, signal.SIGKILL)
        started.set()

    async with httpx.AsyncClient(base_url=base, timeout=DEADLINE_S) as client:
        results = await asyncio.wait_for(asyncio.gather(killer(), *(stream(client, p) for p in PROMPTS)),
                                         DEADLINE_S * 2)
    return dict(results[1:])
