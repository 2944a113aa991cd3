"""The continuous-batching scheduler against coordinator/generate.py's loop on the bundled model:
the same tokens alone, batched with 7 others, joining and leaving mid-stream, chunked prefill."""

import queue

import pytest

from llmtp.common.formats.checkpoint import load_checkpoint
from llmtp.common.formats.tokenizer import load_tokenizer
from llmtp.common.model.sampler import Sampler, SamplerConfig
from llmtp.coordinator.commands.engines import DEFAULT_MODEL_DIR
from llmtp.coordinator.generate import generate
from llmtp.coordinator.local_engine import LocalEngine
from llmtp.coordinator.serve.scheduler import Finished, Rejected, SamplingParams, Scheduler, TextDelta

from serve_tools import GatedEngine

DEADLINE_S = 120
PROMPTS = ["ROMEO:", "Now is the winter", "To be, or not to be, that is the question:", "KING",
           "My lord, I", "What light through yonder window breaks?", "O", "Friends, Romans, countrymen, lend me"]


@pytest.fixture(scope="module")
def model():
    checkpoint = load_checkpoint(DEFAULT_MODEL_DIR / "model.bin")
    tokenizer = load_tokenizer(DEFAULT_MODEL_DIR / "tokenizer.model", checkpoint.config.vocab_size)
    return checkpoint, tokenizer


def reference_ids(model, prompt_ids, max_tokens, temperature=0.0, seed=0, topp=1.0):
    """generate()'s tokens for `max_tokens` new tokens (steps counts the prompt's positions too)."""
    checkpoint, _ = model
    engine = LocalEngine(checkpoint.config, checkpoint.weights, n_slots=1)
    steps = min(len(prompt_ids) + max_tokens - 1, checkpoint.config.seq_len)
    sampler = Sampler(SamplerConfig(temperature=temperature, topp=topp, seed=seed))
    return generate(engine, sampler, prompt_ids, steps).generated_ids


class Collector:
    def __init__(self):
        self.events = queue.Queue()
        self.deltas: list[TextDelta] = []

    def __call__(self, event):
        self.events.put(event)

    def wait_tokens(self, n):
        while len([d for d in self.deltas if d.token_id >= 0]) < n:
            event = self.events.get(timeout=DEADLINE_S)
            assert isinstance(event, TextDelta), event
            self.deltas.append(event)

    def result(self):
        while True:
            event = self.events.get(timeout=DEADLINE_S)
            if isinstance(event, (Finished, Rejected)):
                return event
            self.deltas.append(event)

    @property
    def text(self):
        return "".join(d.text for d in self.deltas)


def make_scheduler(model, n_slots=8, **kwargs):
    checkpoint, tokenizer = model
    return Scheduler(LocalEngine(checkpoint.config, checkpoint.weights, n_slots=n_slots), tokenizer, **kwargs)


def run_one(scheduler, prompt_ids, params):
    collector = Collector()
    scheduler.submit(prompt_ids, params, collector)
    return collector.result(), collector


def test_greedy_alone_equals_batched_with_seven_others_and_generate(model):
    _, tokenizer = model
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    params = SamplingParams(max_tokens=20, temperature=0.0)
    expected = [reference_ids(model, ids, 20) for ids in prompts]
    scheduler = make_scheduler(model, prefill_chunk=16)
    try:
        alone = [run_one(scheduler, ids, params)[0].token_ids for ids in prompts]
        steps_alone = scheduler.metrics.steps
        collectors = [Collector() for _ in prompts]
        for ids, collector in zip(prompts, collectors):
            scheduler.submit(ids, params, collector)
        batched = [collector.result() for collector in collectors]
        steps_batched = scheduler.metrics.steps - steps_alone
    finally:
        scheduler.close()
    assert alone == [tuple(ids) for ids in expected]
    assert [f.token_ids for f in batched] == [tuple(ids) for ids in expected]
    assert all(f.reason == "length" for f in batched)
    assert [c.text for c in collectors] == [tokenizer.decode([ids[-1]] + list(e))[len(tokenizer.decode([ids[-1]])):]
                                           for ids, e in zip(prompts, expected)]
    assert steps_batched < steps_alone / 4  # the 8 streams shared their steps


def test_requests_joining_and_leaving_mid_stream_keep_their_text(model):
    _, tokenizer = model
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    lengths = [30, 6, 25, 3, 18, 12, 28, 9]
    expected = [tuple(reference_ids(model, ids, n)) for ids, n in zip(prompts, lengths)]
    scheduler = make_scheduler(model, n_slots=4, prefill_chunk=3)  # prompts take several steps to prefill
    try:
        collectors = [Collector() for _ in prompts]
        for index in (0, 1):
            scheduler.submit(prompts[index], SamplingParams(max_tokens=lengths[index], temperature=0.0), collectors[index])
        collectors[0].wait_tokens(4)  # others join while 0 streams; 1 and 3 leave early; 8 requests share 4 slots
        for index in range(2, 8):
            scheduler.submit(prompts[index], SamplingParams(max_tokens=lengths[index], temperature=0.0), collectors[index])
        results = [collector.result() for collector in collectors]
    finally:
        scheduler.close()
    assert [r.token_ids for r in results] == expected


def test_seeded_sampling_is_the_samplers_own_stream_in_a_batch(model):
    _, tokenizer = model
    prompts = [tokenizer.encode(text) for text in PROMPTS[:4]]
    expected = [tuple(reference_ids(model, ids, 15, temperature=0.8, seed=100 + i, topp=0.9))
                for i, ids in enumerate(prompts)]
    scheduler = make_scheduler(model, n_slots=4)
    try:
        collectors = [Collector() for _ in prompts]
        for i, (ids, collector) in enumerate(zip(prompts, collectors)):
            scheduler.submit(ids, SamplingParams(max_tokens=15, temperature=0.8, top_p=0.9, seed=100 + i), collector)
        assert [c.result().token_ids for c in collectors] == expected
    finally:
        scheduler.close()


def test_context_full_ends_with_length_like_generate(model):
    checkpoint, tokenizer = model
    seq_len = checkpoint.config.seq_len
    prompt = (tokenizer.encode("ROMEO: " * 200))[:seq_len - 3]
    scheduler = make_scheduler(model, n_slots=2, prefill_chunk=50)
    try:
        finished, _ = run_one(scheduler, prompt, SamplingParams(max_tokens=100, temperature=0.0))
        rejected, _ = run_one(scheduler, prompt + [5, 6, 7], SamplingParams(max_tokens=5, temperature=0.0))
    finally:
        scheduler.close()
    assert finished.token_ids == tuple(reference_ids(model, prompt, 100)) and finished.reason == "length"
    assert len(finished.token_ids) <= 4
    assert isinstance(rejected, Rejected) and rejected.status == 400


def test_stop_string_cuts_the_text_before_it(model):
    _, tokenizer = model
    prompt = tokenizer.encode(PROMPTS[2])
    full = Collector()
    scheduler = make_scheduler(model, n_slots=2)
    try:
        scheduler.submit(prompt, SamplingParams(max_tokens=30, temperature=0.0), full)
        full.result()
        stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
        finished, stopped = run_one(scheduler, prompt, SamplingParams(max_tokens=30, temperature=0.0, stop=(stop, "zzzz")))
    finally:
        scheduler.close()
    assert finished.reason == "stop"
    assert stopped.text == full.text[:full.text.index(stop)]


def gated_scheduler(model, **kwargs):
    checkpoint, tokenizer = model
    engine = GatedEngine(LocalEngine(checkpoint.config, checkpoint.weights, n_slots=1))
    return engine, Scheduler(engine, tokenizer, **kwargs)


def test_cancel_frees_the_slot_and_waiting_requests_get_503(model):
    _, tokenizer = model
    prompt = tokenizer.encode(PROMPTS[0])
    engine, scheduler = gated_scheduler(model, queue_timeout=0.0)
    try:
        long_one = Collector()
        ticket = scheduler.submit(prompt, SamplingParams(max_tokens=10_000, temperature=0.0), long_one)
        engine.permits.release(2)  # prefill, one decode step
        long_one.wait_tokens(2)
        waiting = Collector()
        scheduler.submit(prompt, SamplingParams(max_tokens=3, temperature=0.0), waiting)
        engine.permits.release(1)  # the loop comes round: the one slot is busy and the wait is over
        waited = waiting.result()
        ticket.cancel()
        engine.permits.release(1)
        assert long_one.result().reason == "cancelled"
        engine.permits.release(1000)
        after, _ = run_one(scheduler, prompt, SamplingParams(max_tokens=5, temperature=0.0))
    finally:
        engine.permits.release(1000)
        scheduler.close()
    assert isinstance(waited, Rejected) and waited.status == 503 and waited.retry_after >= 1
    assert after.token_ids == tuple(reference_ids(model, prompt, 5))
    text = scheduler.metrics.exposition()
    assert 'llmtp_requests_total{outcome="cancelled"} 1' in text
    assert 'llmtp_requests_total{outcome="rejected"} 1' in text
    assert "llmtp_slots_busy 0" in text


def test_close_ends_running_streams_with_an_error(model):
    _, tokenizer = model
    engine, scheduler = gated_scheduler(model)
    collector = Collector()
    scheduler.submit(tokenizer.encode("O"), SamplingParams(max_tokens=10_000, temperature=0.0), collector)
    engine.permits.release(1)
    collector.wait_tokens(1)
    scheduler._stopping.set()
    engine.permits.release(1000)
    scheduler.close()
    result = collector.result()
    assert result.reason == "error" and "shutting down" in result.error
