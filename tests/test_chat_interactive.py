"""`llmtp chat` at a terminal: a pty for stdin and stdout (so readline is on), stderr on a pipe.
Ctrl-C mid-answer returns to the prompt and the next turn still answers, Ctrl-C at the prompt
ends without a traceback, Ctrl-D ends with 0, and --workers 2 leaves no worker behind.

To press Ctrl-C mid-answer without a race, the test stops the chat process (SIGSTOP) once the
answer is streaming, queues SIGINT, and lets it go on (SIGCONT): the signal lands inside the
answer, whose greedy length (checked first, from generate) is far more than what was shown."""

import os
import platform
import pty
import select
import signal
import subprocess
import time

import pytest

from llmtp.common.formats.checkpoint import load_checkpoint
from llmtp.common.formats.tokenizer import load_tokenizer
from llmtp.coordinator.commands.engines import DEFAULT_MODEL_DIR

from cli_runner import llmtp_command
from process_tools import wait_until_gone, worker_children_of
from test_chat import greedy, text_of

DEADLINE_S = 120
MESSAGE = "Who goes there?"
SELECT_SYSCALLS = {"7", "23", "270", "271"}  # x86-64 poll, select, pselect6, ppoll


class PtyChat:
    def __init__(self, *args):
        self.master, slave = pty.openpty()
        env = dict(os.environ, PYTHONUNBUFFERED="1", TERM="dumb")
        self.process = subprocess.Popen(llmtp_command() + ["chat", *map(str, args)], stdin=slave, stdout=slave,
                                        stderr=subprocess.PIPE, env=env, start_new_session=True)
        os.close(slave)
        self.output = b""

    def read_until(self, marker: bytes, start: int = 0) -> int:
        """Read the terminal until `marker` appears at or after `start`; its end offset."""
        deadline = time.monotonic() + DEADLINE_S
        while marker not in self.output[start:]:
            assert time.monotonic() < deadline, f"no {marker!r} in {self.output[start:]!r}"
            readable, _, _ = select.select([self.master], [], [], 1.0)
            if readable:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: the process closed the terminal
                    chunk = b""
                assert chunk, f"the terminal closed before {marker!r}: {self.output[start:]!r}"
                self.output += chunk
        return self.output.index(marker, start) + len(marker)

    def wait_in_select(self) -> None:
        """Until readline waits for a key in select: a signal sent before it gets there would
        wait for the next key (CPython's readline checks signals only when select is interrupted)."""
        deadline = time.monotonic() + DEADLINE_S
        while True:
            with open(f"/proc/{self.process.pid}/syscall") as syscall:
                if syscall.read().split()[0] in SELECT_SYSCALLS:
                    return
            assert time.monotonic() < deadline, "the chat never waited for input"
            time.sleep(0.01)

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def finish(self) -> tuple[int, str]:
        try:
            _, stderr = self.process.communicate(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise
        finally:
            os.close(self.master)
        return self.process.returncode, stderr.decode()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(DEADLINE_S)


@pytest.fixture(scope="module")
def long_answer():
    """The greedy answer to MESSAGE runs on (no EOS) for well over a hundred tokens."""
    checkpoint = load_checkpoint(DEFAULT_MODEL_DIR / "model.bin")
    tokenizer = load_tokenizer(DEFAULT_MODEL_DIR / "tokenizer.model", checkpoint.config.vocab_size)
    prompt = [tokenizer.bos_id] + tokenizer.encode(f"[INST] {MESSAGE} [/INST]", bos=False)
    answer = greedy(checkpoint, tokenizer, prompt, 150)
    assert len(answer) == 150  # no EOS among them
    return text_of(tokenizer, answer, prompt[-1]), answer


@pytest.mark.parametrize("workers", [0, 2])
def test_ctrl_c_stops_the_answer_and_ctrl_d_ends(workers, long_answer):
    chat = PtyChat("-t", "0", "-w", workers)
    try:
        end = chat.read_until(b"User: ")
        workers_seen = worker_children_of(chat.process.pid)
        chat.type(MESSAGE.encode() + b"\r")
        answer_start = end = chat.read_until(b"Assistant: ", end)
        chat.read_until(b" ", end + 2)  # some of the answer has streamed
        os.kill(chat.process.pid, signal.SIGSTOP)
        os.kill(chat.process.pid, signal.SIGINT)
        os.kill(chat.process.pid, signal.SIGCONT)
        end = chat.read_until(b"User: ", end)  # back at the prompt
        shown = chat.output[answer_start:end - len(b"\r\nUser: ")].replace(b"\r\n", b"\n").decode()
        chat.type(MESSAGE.encode() + b"\r")
        end = chat.read_until(b"Assistant: ", end)
        chat.read_until(b" ", end + 2)  # the next turn answers: the engine is still in step
        os.kill(chat.process.pid, signal.SIGSTOP)
        os.kill(chat.process.pid, signal.SIGINT)
        os.kill(chat.process.pid, signal.SIGCONT)
        end = chat.read_until(b"User: ", end)
        chat.type(b"\x04")  # Ctrl-D on an empty line
        code, stderr = chat.finish()
    finally:
        chat.kill()
    assert code == 0, stderr
    assert stderr.count("answer stopped (Ctrl-C)") == 2 and "Traceback" not in stderr
    full_text, _ = long_answer
    assert full_text.startswith(shown) and len(shown) < len(full_text)
    assert len(workers_seen) == workers
    assert not wait_until_gone(workers_seen, DEADLINE_S)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="reads x86-64 syscall numbers from /proc")
def test_ctrl_c_at_the_prompt_ends_without_a_traceback():
    chat = PtyChat()
    try:
        chat.read_until(b"User: ")
        chat.wait_in_select()
        os.kill(chat.process.pid, signal.SIGINT)
        code, stderr = chat.finish()
    finally:
        chat.kill()
    assert code == 130 and "Traceback" not in stderr and "interrupted" in stderr
