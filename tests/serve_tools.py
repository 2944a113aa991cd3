"""Servers for tests: the app on a socket of its own, in a thread of the test process; and an
engine whose steps run only when the test allows them."""

import socket
import threading

import uvicorn

from llmtp.common.formats.chat_template import BUILTIN_TEMPLATES
from llmtp.coordinator.serve.app import ServeApp, ServeSettings
from llmtp.coordinator.serve.scheduler import Scheduler

DEADLINE_S = 120


class GatedEngine:
    """Runs a step only when the test hands it a permit, so what happens between steps is fixed
    by the test, not by thread timing."""

    def __init__(self, engine):
        self.engine, self.config, self.n_slots = engine, engine.config, engine.n_slots
        self.permits = threading.Semaphore(0)

    def step(self, tokens, sequences, all_logits=False):
        assert self.permits.acquire(timeout=DEADLINE_S)
        return self.engine.step(tokens, sequences, all_logits)

    def close(self):
        self.engine.close()


class BackgroundServer:
    """uvicorn serving a ServeApp on 127.0.0.1 at a port the kernel picked, until stop()."""

    def __init__(self, engine, tokenizer, template=BUILTIN_TEMPLATES["llama2"], prefill_chunk=64, **settings):
        self.scheduler = Scheduler(engine, tokenizer, prefill_chunk=prefill_chunk,
                                   queue_timeout=settings.get("queue_timeout", 30.0))
        app = ServeApp(self.scheduler, tokenizer, template, ServeSettings(model_name="test-model", **settings))
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app.build(), log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def start(self) -> "BackgroundServer":
        self.thread.start()
        started = threading.Event()
        while not self.server.started:
            assert self.thread.is_alive(), "the server thread died while starting"
            started.wait(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(DEADLINE_S)
        self.scheduler.close()
        self.socket.close()
        assert not self.thread.is_alive()
