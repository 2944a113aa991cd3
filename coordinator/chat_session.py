"""A conversation held in one KV slot, turn after turn, for `llmtp chat` and `generate -m chat`.

The conversation's token ids are the chat template's rendering of every message so far, with
each answer spelled as the ids the model actually generated (never re-encoded from its text:
that is what sits in the KV cache, and a re-encoding may split words differently). The KV
cache holds a prefix of those ids, so a new turn prefills only what follows the longest prefix
it shares with the cache: its own tokens (and the template's closing of the previous answer).

When a turn does not fit, the oldest turns are dropped (the system prompt stays) and the
conversation that remains is prefilled again; with `drop_old_turns` off (run.c's chat mode)
the conversation ends instead. An answer that reaches the end of the context stops there.
"""

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from llmtp.common.formats.chat_template import ChatMessage, ChatTemplate, TemplateError
from llmtp.common.model.transformer import StepSequence

from .serve.text_stream import TextStream

# Private-use codepoints the template renders in place of BOS, EOS and each answer (answer i is
# ANSWER_BASE + i), so that only the template makes special ids and answers keep their ids.
# Message text is cleaned of the whole range first.
BOS_MARK, EOS_MARK, ANSWER_BASE = 0xE000, 0xE001, 0xE100
MARK_RANGE = re.compile("[\ue000-\ue8ff]")
MARK_SPLIT = re.compile("([\ue000-\ue8ff])")
MAX_TURNS = 0xE8FF - ANSWER_BASE  # answers a rendering can mark; far more than any context holds
ANSWER_ROOM_SHARE = 4  # a new turn is given room for max(1, seq_len / this) answer tokens before old turns go


@dataclass
class Turn:
    user: str
    answer: str = ""
    answer_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class TurnResult:
    """reason: "stop" (EOS or a stop string), "length" (the answer's token limit), "context"
    (the context is full), "interrupted", or "not_sent" (the message alone does not fit, or the
    template refused it; it was not added). prefilled: ids run through prefill for this turn;
    dropped: earlier turns dropped."""

    text: str
    reason: str
    prefilled: int
    dropped: int
    answer_ids: tuple[int, ...]


@dataclass(frozen=True)
class Prepared:
    user: str
    ids: list[int] | None
    dropped: int


class ChatSession:
    def __init__(self, engine, tokenizer, template: ChatTemplate, sampler, system: str | None = None,
                 max_answer_tokens: int = 0, max_positions: int | None = None, drop_old_turns: bool = True,
                 notify: Callable[[str], None] = lambda message: None, slot: int = 0):
        """max_answer_tokens: 0 = until the context is full; max_positions: a limit below the
        model's context (run.c's -n steps); notify: one-line notices for the user."""
        self.engine, self.tokenizer, self.template, self.sampler = engine, tokenizer, template, sampler
        self.system = system or None
        self.max_answer_tokens = max_answer_tokens
        self.context = min(engine.config.seq_len, max_positions or engine.config.seq_len)
        self.drop_old_turns = drop_old_turns
        self.notify = notify
        self.slot = slot
        self.turns: list[Turn] = []
        self.cached: list[int] = []  # ids whose keys and values are at positions 0.. of the slot
        self.ended = False  # run.c's chat mode: the steps are used up

    # --- rendering ---

    def conversation_ids(self, turns: list[Turn], next_user: str | None) -> list[int]:
        """The template's rendering of the system prompt, `turns` and (with a generation prompt)
        next_user, as ids: answers as their own ids, text runs encoded one by one."""
        messages = [ChatMessage("system", _clean(self.system))] if self.system else []
        turns = turns[-MAX_TURNS:]
        for index, turn in enumerate(turns):
            messages += [ChatMessage("user", _clean(turn.user)), ChatMessage("assistant", chr(ANSWER_BASE + index))]
        if next_user is not None:
            messages.append(ChatMessage("user", _clean(next_user)))
        text = self.template.render(messages, add_generation_prompt=next_user is not None,
                                    bos_token=chr(BOS_MARK), eos_token=chr(EOS_MARK))
        ids: list[int] = []
        for part in MARK_SPLIT.split(text):
            if len(part) == 1 and MARK_RANGE.match(part):
                mark = ord(part)
                if mark == BOS_MARK:
                    ids.append(self.tokenizer.bos_id)
                elif mark == EOS_MARK:
                    ids.append(self.tokenizer.eos_id)
                else:
                    ids.extend(turns[mark - ANSWER_BASE].answer_ids)
            elif part:
                ids.extend(self.tokenizer.encode(part, bos=False))
        if not ids or ids[0] != self.tokenizer.bos_id:
            ids = [self.tokenizer.bos_id] + ids  # as serve: llama2.c-style models start at BOS
        return ids

    # --- a turn ---

    def ask(self, user: str, on_text: Callable[[str], None] = lambda text: None,
            interrupted: Callable[[], bool] = lambda: False) -> TurnResult:
        """prepare then respond: one whole turn."""
        prepared = self.prepare(user)
        if prepared.ids is None:
            return TurnResult("", "not_sent", 0, prepared.dropped, ())
        return self.respond(prepared, on_text, interrupted)

    def prepare(self, user: str) -> "Prepared":
        """The turn's conversation ids, old turns dropped to fit (with a notice); ids None when
        the message cannot be sent."""
        try:
            ids, dropped = self.fit(user)
        except TemplateError as error:  # e.g. a template that allows no system prompt
            self.notify(f"chat template {self.template.name}: {error}: not sent")
            return Prepared(user, None, 0)
        return Prepared(user, ids, dropped)

    def respond(self, prepared: "Prepared", on_text: Callable[[str], None] = lambda text: None,
                interrupted: Callable[[], bool] = lambda: False) -> TurnResult:
        """Prefill the new tokens, then sample the answer, streaming its text through on_text;
        interrupted() is checked between steps (a step itself always completes)."""
        ids = prepared.ids
        shared = min(_common_prefix(self.cached, ids), len(ids) - 1)  # prefill at least one id for logits
        new = ids[shared:]
        self.cached = self.cached[:shared]  # past a failed step nothing beyond is trusted
        logits = self.engine.step(np.asarray(new), [StepSequence(self.slot, shared, len(new))])[0]
        self.cached = list(ids)
        turn = Turn(prepared.user)
        self.turns.append(turn)
        reason = self.answer(turn, logits, on_text, interrupted)
        return TurnResult(turn.answer, reason, len(new), prepared.dropped, tuple(turn.answer_ids))

    def fit(self, user: str) -> tuple[list[int] | None, int]:
        """The conversation's ids with the new message, dropping the oldest turns while it leaves too
        little room for an answer; None when the message alone does not fit."""
        room = max(1, self.context // ANSWER_ROOM_SHARE)
        if self.max_answer_tokens:
            room = min(room, self.max_answer_tokens)
        dropped = 0
        ids = self.conversation_ids(self.turns, user)
        while len(ids) + room > self.context and self.turns and self.drop_old_turns:
            self.turns.pop(0)
            dropped += 1
            ids = self.conversation_ids(self.turns, user)
        if dropped:
            self.notify(f"the context ({self.context} tokens) is full: dropped the oldest {dropped} "
                        f"turn{'s' if dropped > 1 else ''}, prefilling the {len(ids)} tokens that remain")
        if len(ids) >= self.context:
            if self.drop_old_turns:
                self.notify(f"that message is {len(ids)} tokens with the template; the context holds "
                            f"{self.context} and needs room for an answer: not sent")
            else:
                self.notify(f"the conversation reached its {self.context} positions (-n): it ends here")
                self.ended = True
            return None, dropped
        return ids, dropped

    def answer(self, turn: Turn, logits, on_text, interrupted) -> str:
        prompt_last = self.cached[-1]
        stream = TextStream(self.tokenizer, self.template.stop, previous_id=prompt_last)
        reason = None
        while reason is None:
            token = self.sampler.sample(logits)
            if token in self.tokenizer.stop_ids:
                reason = "stop"
                break
            turn.answer_ids.append(token)
            text = stream.push(token)
            turn.answer += text
            if text:
                on_text(text)
            if stream.stopped:
                reason = "stop"
                turn.answer_ids = self.ids_before_stop(turn.answer_ids, turn.answer, prompt_last)
            elif self.max_answer_tokens and len(turn.answer_ids) >= self.max_answer_tokens:
                reason = "length"
            elif len(self.cached) >= self.context:  # sampled at the last position: shown, never fed
                reason = "context"
            elif interrupted():
                reason = "interrupted"
            else:
                logits = self.engine.step(np.asarray([token]), [StepSequence(self.slot, len(self.cached), 1)])[0]
                self.cached.append(token)
        tail = stream.finish()
        if tail:
            turn.answer += tail
            on_text(tail)
        if reason == "context" and not self.drop_old_turns:
            self.ended = True
        return reason

    def ids_before_stop(self, ids: list[int], visible: str, previous_id: int) -> list[int]:
        """The longest prefix of ids whose text is a prefix of the visible answer: the tokens of a
        stop string are not part of the answer the template closes."""
        for keep in range(len(ids), -1, -1):
            decoder = self.tokenizer.stream_decoder(previous_id)
            text = "".join(decoder.push(token) for token in ids[:keep])
            if visible.startswith(text):
                return ids[:keep]
        return []


def _clean(text: str) -> str:
    return MARK_RANGE.sub("", text)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for index in range(n):
        if a[index] != b[index]:
            return index
    return n
