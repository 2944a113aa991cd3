"""The interactive prompt of `llmtp chat` and `generate -m chat`: read a line (with readline's
editing on a terminal), stream the answer, repeat. Ctrl-D at the prompt ends with 0; Ctrl-C
during an answer stops it after the current step and returns to the prompt; Ctrl-C at the
prompt ends the command as every llmtp command ends on it.

Ctrl-C during an answer only sets a flag: a KeyboardInterrupt inside a step could leave a
worker's reply unread, and the next step would read it as its own."""

import signal
import sys
import threading
from contextlib import contextmanager

from .chat_session import ChatSession

USER_PROMPT, ASSISTANT_PREFIX = "User: ", "Assistant: "  # as run.c's chat mode
SYSTEM_PROMPT_QUESTION = "Enter system prompt (optional): "


def enable_line_editing() -> None:
    """readline gives input() history and editing, on a terminal only (elsewhere it may write
    terminal escapes into piped output)."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (importing it is what turns it on)
        except ImportError:  # a Python built without it: plain input() still works
            pass


def read_line(prompt: str) -> str | None:
    """A line from the user; None at end of input (Ctrl-D)."""
    try:
        return input(prompt)
    except EOFError:
        sys.stdout.write("\n")
        return None


@contextmanager
def interrupt_flag():
    """While inside: SIGINT sets the yielded event instead of raising KeyboardInterrupt."""
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield pressed  # signals reach the main thread only; nothing to catch here
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.set())
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def chat_loop(session: ChatSession, first_user: str | None = None) -> int:
    """Turns until Ctrl-D (or, in run.c's chat mode, until the steps are used up)."""
    enable_line_editing()
    pending = first_user or None
    while not session.ended:
        user = pending if pending is not None else read_line(USER_PROMPT)
        pending = None
        if user is None:
            return 0
        if not user.strip():
            continue
        prepared = session.prepare(user)
        if prepared.ids is None:
            continue
        write(ASSISTANT_PREFIX)
        with interrupt_flag() as pressed:
            result = session.respond(prepared, on_text=write, interrupted=pressed.is_set)
        write("\n")
        if result.reason == "interrupted":
            note("answer stopped (Ctrl-C); Ctrl-D or Ctrl-C at the prompt ends the chat")
        elif result.reason == "context" and session.ended:
            note(f"the conversation reached its {session.context} positions (-n): it ends here")
        elif result.reason == "context":
            note(f"the context ({session.context} tokens) is full: the answer stops here; "
                 f"the next message drops the oldest turns")
    return 0


def note(message: str) -> None:
    sys.stdout.flush()
    print(f"llmtp: {message}", file=sys.stderr, flush=True)
