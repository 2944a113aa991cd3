"""`llmtp chat` and `generate -m chat` on the bundled model, against coordinator/generate.py's loop
on the whole conversation, spelled here as run.c's chat mode spells it: each user turn
BOS + "[INST] ... [/INST]" (the first with the <<SYS>> block), each answer its generated ids
followed by EOS. The session's steps are counted by a wrapper engine, so "a new turn prefills
only its own tokens" is a count of what reached the engine."""

import pytest

from llmtp.common.formats.chat_template import BUILTIN_TEMPLATES
from llmtp.common.formats.checkpoint import load_checkpoint
from llmtp.common.formats.tokenizer import load_tokenizer
from llmtp.common.model.sampler import Sampler, SamplerConfig
from llmtp.coordinator.chat_session import ChatSession
from llmtp.coordinator.commands.engines import DEFAULT_MODEL_DIR
from llmtp.coordinator.generate import generate
from llmtp.coordinator.local_engine import LocalEngine

from cli_runner import run_llmtp

SYSTEM, FIRST, SECOND = "You are a king.", "Who goes there?", "What news from Rome?"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def model():
    checkpoint = load_checkpoint(DEFAULT_MODEL_DIR / "model.bin")
    tokenizer = load_tokenizer(DEFAULT_MODEL_DIR / "tokenizer.model", checkpoint.config.vocab_size)
    return checkpoint, tokenizer


class CountingEngine:
    """An in-process engine that records (start position, tokens) of every step."""

    def __init__(self, checkpoint):
        self.engine = LocalEngine(checkpoint.config, checkpoint.weights, n_slots=1)
        self.config, self.n_slots = self.engine.config, 1
        self.steps: list[tuple[int, list[int]]] = []

    def step(self, tokens, sequences, all_logits=False):
        self.steps.append((sequences[0].start_position, [int(t) for t in tokens]))
        return self.engine.step(tokens, sequences, all_logits)

    def close(self):
        pass


def first_turn_ids(tokenizer, system, user):
    return [tokenizer.bos_id] + tokenizer.encode(f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]", bos=False)


def later_turn_ids(tokenizer, user):
    return [tokenizer.bos_id] + tokenizer.encode(f"[INST] {user} [/INST]", bos=False)


def greedy(checkpoint, tokenizer, prompt_ids, max_tokens):
    engine = LocalEngine(checkpoint.config, checkpoint.weights, n_slots=1)
    steps = min(len(prompt_ids) + max_tokens - 1, checkpoint.config.seq_len)
    return generate(engine, Sampler(SamplerConfig(temperature=0.0)), prompt_ids, steps,
                    stop_ids=tokenizer.stop_ids).generated_ids


def text_of(tokenizer, ids, previous_id):
    decoder = tokenizer.stream_decoder(previous_id)
    return "".join(decoder.push(token) for token in ids) + decoder.flush()


def session(model, engine, **kwargs):
    _, tokenizer = model
    return ChatSession(engine, tokenizer, BUILTIN_TEMPLATES["llama2"], Sampler(SamplerConfig(temperature=0.0)),
                       **kwargs)


def two_turns_expected(model):
    checkpoint, tokenizer = model
    turn1 = first_turn_ids(tokenizer, SYSTEM, FIRST)
    answer1 = greedy(checkpoint, tokenizer, turn1, MAX_TOKENS)
    whole = turn1 + answer1 + [tokenizer.eos_id] + later_turn_ids(tokenizer, SECOND)
    answer2 = greedy(checkpoint, tokenizer, whole, MAX_TOKENS)
    return turn1, answer1, whole, answer2


def test_second_turn_equals_generate_on_the_whole_conversation_and_prefills_only_its_tokens(model):
    checkpoint, tokenizer = model
    turn1, answer1, whole, answer2 = two_turns_expected(model)
    engine = CountingEngine(checkpoint)
    chat = session(model, engine, system=SYSTEM, max_answer_tokens=MAX_TOKENS)

    first = chat.ask(FIRST)
    assert list(first.answer_ids) == answer1 and first.prefilled == len(turn1)
    n_steps = len(engine.steps)
    second = chat.ask(SECOND)
    assert list(second.answer_ids) == answer2
    start, prefilled = engine.steps[n_steps]
    # Everything of turn 1 the engine was fed stays: at most the last answer token (sampled, never fed) is new.
    assert start >= len(turn1) + len(answer1) - 1
    assert prefilled == whole[start:] and second.prefilled == len(prefilled)
    assert second.text == text_of(tokenizer, answer2, whole[-1])


def test_context_overflow_drops_the_oldest_turns_and_answers_like_generate(model):
    checkpoint, tokenizer = model
    notices = []
    engine = CountingEngine(checkpoint)
    chat = session(model, engine, system=SYSTEM, max_answer_tokens=MAX_TOKENS, notify=notices.append)
    messages = [f"{n}. Now is the winter of our discontent made glorious summer by this sun of York." * 2
                for n in range(6)]
    results = [chat.ask(message) for message in messages]
    assert sum(result.dropped for result in results) > 0 and len(chat.turns) < len(messages)
    assert any("dropped the oldest" in notice for notice in notices)
    # What is left is the system prompt folded into the first turn kept, then the later turns:
    # the last answer is generate's on exactly that conversation.
    kept = chat.turns[:-1]
    expected_ids = []
    for index, turn in enumerate(kept):
        expected_ids += first_turn_ids(tokenizer, SYSTEM, turn.user) if index == 0 else later_turn_ids(tokenizer,
                                                                                                     turn.user)
        expected_ids += turn.answer_ids + [tokenizer.eos_id]
    expected_ids += later_turn_ids(tokenizer, messages[-1]) if kept else first_turn_ids(tokenizer, SYSTEM,
                                                                                        messages[-1])
    assert list(results[-1].answer_ids) == greedy(checkpoint, tokenizer, expected_ids, MAX_TOKENS)
    assert all(position + len(tokens) <= checkpoint.config.seq_len for position, tokens in engine.steps)


def test_a_message_longer_than_the_context_is_refused_with_a_notice(model):
    checkpoint, _ = model
    notices = []
    chat = session(model, CountingEngine(checkpoint), notify=notices.append)
    result = chat.ask("To be, or not to be. " * 200)
    assert result.reason == "not_sent" and not chat.turns and "not sent" in notices[0]
    assert chat.ask(FIRST).reason in ("stop", "context")  # and the chat goes on


def test_an_answer_reaching_the_end_of_the_context_stops_there(model):
    checkpoint, _ = model
    chat = session(model, CountingEngine(checkpoint))
    result = chat.ask(FIRST)
    if result.reason == "stop":
        pytest.skip("the greedy answer ended before the context did")
    assert result.reason == "context" and len(chat.cached) == checkpoint.config.seq_len


def test_chat_cli_two_turns_print_generates_answers(model):
    _, tokenizer = model
    turn1, answer1, whole, answer2 = two_turns_expected(model)
    result = run_llmtp("chat", "-t", "0", "-n", MAX_TOKENS, "-y", SYSTEM, input=f"{FIRST}\n{SECOND}\n")
    assert result.returncode == 0, result.stderr
    expected = (f"User: Assistant: {text_of(tokenizer, answer1, turn1[-1])}\n"
                f"User: Assistant: {text_of(tokenizer, answer2, whole[-1])}\nUser: \n")
    assert result.stdout == expected
    assert "Traceback" not in result.stderr


def test_generate_chat_mode_is_run_c_chat(model):
    """run.c's chat(): the system prompt asked for on stdin (no -y), the first turn from -i, and
    the conversation over once -n positions are used (this model's greedy answers run long)."""
    checkpoint, tokenizer = model
    steps = 60
    turn1 = first_turn_ids(tokenizer, SYSTEM, FIRST)
    answer1 = greedy(checkpoint, tokenizer, turn1, steps - len(turn1) + 1)
    assert tokenizer.eos_id not in answer1 and len(turn1) + len(answer1) == steps + 1
    result = run_llmtp("generate", "-m", "chat", "-t", "0", "-n", steps, "-i", FIRST, input=f"{SYSTEM}\n{SECOND}\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"Enter system prompt (optional): Assistant: {text_of(tokenizer, answer1, turn1[-1])}\n"
    assert "reached its 60 positions" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["-t", "-1"], "-t/--temperature must be >= 0"),
    (["--chat-template", "nonesuch"], "neither llama2 nor chatml nor a file"),
    (["/nonexistent/model.bin"], "/nonexistent/"),
])
def test_bad_chat_arguments_exit_2_in_one_line(args, message):
    result = run_llmtp("chat", *args, input="")
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_chat_at_end_of_input_exits_0():
    result = run_llmtp("chat", input="")
    assert result.returncode == 0 and result.stdout == "User: \n"


def test_chat_on_2_workers_overflowing_the_context_prints_what_in_process_prints():
    """Dropping turns re-prefills from an earlier position: the workers' caches follow."""
    lines = "".join(f"{word}\n" for word in ("a", "b", "c", "d"))
    local = run_llmtp("chat", "-t", "0", "-n", 100, input=lines)
    workers = run_llmtp("chat", "-t", "0", "-n", 100, "-w", 2, input=lines)
    assert local.returncode == workers.returncode == 0, workers.stderr
    assert "dropped the oldest" in workers.stderr
    assert workers.stdout == local.stdout


def test_a_template_that_refuses_the_messages_is_a_notice_not_a_crash(model, tmp_path):
    checkpoint, tokenizer = model
    from llmtp.common.formats.chat_template import jinja_template
    refusing = jinja_template("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}"
                              "{% endif %}{{ messages[-1]['content'] }}", name="strict")
    notices = []
    chat = ChatSession(CountingEngine(checkpoint), tokenizer, refusing, Sampler(SamplerConfig(temperature=0.0)),
                       system=SYSTEM, notify=notices.append)
    assert chat.ask(FIRST).reason == "not_sent" and "no system" in notices[0]
