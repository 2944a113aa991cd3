"""The generation loop: prefill the prompt in one step, then sample and feed one token
per step, streaming text as it completes. Works with any engine that has `step`."""

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Collection

import numpy as np

from llmtp.common.formats.tokenizer import Tokenizer
from llmtp.common.model.sampler import Sampler
from llmtp.common.model.transformer import StepSequence

# What run.c stops on with a llama2.c tokenizer; a caller holding a tokenizer passes its own ids.
LLAMA2C_STOP_IDS = (Tokenizer.bos_id, Tokenizer.eos_id)


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    generated_ids: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    n_decode_steps: int = 0

    @property
    def prefill_tokens_per_second(self) -> float:
        return len(self.prompt_ids) / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.n_decode_steps / self.decode_seconds if self.decode_seconds else 0.0


def generate(engine, sampler: Sampler, prompt_ids: list[int], steps: int,
             on_token: Callable[[int], None] = lambda token: None, slot: int = 0,
             stop_ids: Collection[int] = LLAMA2C_STOP_IDS, echo_from: int = 1) -> GenerationResult:
    """Like run.c's generate(): `steps` counts positions including the prompt; the token
    sampled after the last position is emitted but not fed. Stops early on any of `stop_ids`
    (the tokenizer's BOS and EOS).

    on_token is called with each prompt id from `echo_from` (1: after BOS; 0 for a tokenizer
    that adds none), then each generated id."""
    assert 1 <= len(prompt_ids) <= steps <= engine.config.seq_len, (len(prompt_ids), steps)
    result = GenerationResult(prompt_ids=list(prompt_ids))
    for token in prompt_ids[echo_from:]:
        on_token(token)

    started = time.perf_counter()
    logits = engine.step(np.asarray(prompt_ids), [StepSequence(slot, 0, len(prompt_ids))])[0]
    result.prefill_seconds = time.perf_counter() - started

    position = len(prompt_ids)
    started = time.perf_counter()
    while True:
        token = sampler.sample(logits)
        if token in stop_ids:
            break
        result.generated_ids.append(token)
        on_token(token)
        if position >= steps:
            break
        logits = engine.step(np.asarray([token]), [StepSequence(slot, position, 1)])[0]
        position += 1
        result.n_decode_steps += 1
    result.decode_seconds = time.perf_counter() - started
    return result


def report_speed(result: GenerationResult, stream=sys.stderr) -> None:
    print(f"prefill: {len(result.prompt_ids)} tokens, {result.prefill_tokens_per_second:.1f} tok/s; "
          f"decode: {result.n_decode_steps} tokens, {result.decode_tokens_per_second:.1f} tok/s", file=stream)
