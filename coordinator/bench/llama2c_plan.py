"""`bench --llama2c DIR`: which llama2.c rows one run times, on which files (llama2c.py runs them)."""

import sys
from dataclasses import dataclass, field
from pathlib import Path

from .llama2c import (COUNTING, FIRST_TOKEN_PROMPT_TOKENS, THREADS, FirstTokenRow, ProgramRow, find_programs,
                      llmtp_command, pinned, thread_label)
from .llama2c_files import check_prompt, llama2c_copy, prompt_text, synthetic_tokenizer
from .results import EngineResult, FirstTokenResult, streamed_bytes_per_token

RUNQ_VARIANT = "v2"


@dataclass
class Llama2cPlan:
    rows: list[ProgramRow] = field(default_factory=list)
    first_token_rows: list[FirstTokenRow] = field(default_factory=list)
    # the version 2 copy runq.c reads, which llmtp measures too (its own rows), and the worker
    # counts that keep its int8 groups whole
    runq_file: Path | None = None
    runq_worker_counts: list[int] = field(default_factory=list)
    thread_counts: list[int] = field(default_factory=list)
    checks: list[FirstTokenRow] = field(default_factory=list)  # each program once, on a 2-step run
    counting: str = COUNTING

    def check(self) -> None:
        """Each program and each first-token command once, untimed: fails early in one line, and
        leaves files in the page cache and the 2-worker shards written."""
        for row in self.checks + self.first_token_rows:
            row.check()

    def time_rows(self, label_of) -> list[EngineResult]:
        return [timing for row in self.rows if (timing := row.time(label_of)) is not None]

    def time_first_tokens(self, label_of) -> list[FirstTokenResult]:
        return [timing for row in self.first_token_rows if (timing := row.time(label_of)) is not None]


def plan_llama2c(folder: Path, checkpoint_path: Path, source, prompt_tokens: int, decode_tokens: int,
                 worker_counts: list[int]) -> Llama2cPlan:
    """source: the measured model, loaded. run.c rows when it is float32; runq.c rows on its version
    2 copy (written once into the cache), which llmtp then also measures."""
    from llmtp.common.formats.load import load_model
    from llmtp.common.model.quantize import cuttable_worker_counts

    from ..local_cluster import usable_cpus
    from .run import weights_name
    programs = find_programs(folder)
    config = source.config
    cpus = usable_cpus()
    plan = Llama2cPlan(thread_counts=[t for t in THREADS if t <= len(cpus)])
    tokenizer = synthetic_tokenizer(config.vocab_size)
    text = prompt_text(prompt_tokens)
    check_prompt(tokenizer, config.vocab_size, text, prompt_tokens)
    steps = str(prompt_tokens + decode_tokens)

    def add_rows(program: str, path: Path, weights: str, mb: float, variant: str) -> None:
        for threads in plan.thread_counts:
            command = [str(programs[program]), str(path), "-z", str(tokenizer), "-t", "0", "-s", "1", "-n", steps,
                       "-i", text]
            plan.rows.append(ProgramRow(thread_label(program, threads), program, pinned(command, cpus[:threads]),
                                        threads, weights, mb, variant))
        plan.checks.append(FirstTokenRow(f"{program} (check)", program, [
            str(programs[program]), str(path), "-z", str(tokenizer), "-t", "0", "-n", "2", "-i", ""], 1))

    if "run.c" in programs:
        if weights_name(source) != "f32":
            print(f"bench: {checkpoint_path.name} is not float32 ({weights_name(source)}): no run.c rows",
                  file=sys.stderr)
        else:
            v0 = llama2c_copy(checkpoint_path, 0)
            add_rows("run.c", v0, "f32", streamed_bytes_per_token(config, source.weights) / 1e6, "")
            plan.first_token_rows = first_token_rows(programs["run.c"], v0, tokenizer, config, cpus,
                                                     max(plan.thread_counts))
    if "runq.c" in programs:
        plan.runq_file = llama2c_copy(checkpoint_path, 2)
        copy = load_model(plan.runq_file)
        add_rows("runq.c", plan.runq_file, weights_name(copy), streamed_bytes_per_token(config, copy.weights) / 1e6,
                 RUNQ_VARIANT)
        plan.runq_worker_counts = [n for n in worker_counts if n in cuttable_worker_counts(config, copy.group_size)]
    return plan


def first_token_rows(run: Path, model: Path, tokenizer: Path, config, cpus: list[int],
                     threads: int) -> list[FirstTokenRow]:
    """run.c with `threads` threads, `llmtp generate` in process and with 2 workers, all pinned to
    the same cores, -n 6 on a 5-token prompt."""
    text = prompt_text(FIRST_TOKEN_PROMPT_TOKENS)
    check_prompt(tokenizer, config.vocab_size, text, FIRST_TOKEN_PROMPT_TOKENS)
    cores = cpus[:threads]
    tail = ["-z", str(tokenizer), "-t", "0", "-s", "1", "-n", str(FIRST_TOKEN_PROMPT_TOKENS + 1), "-i", text]
    generate = llmtp_command() + ["generate", str(model)] + tail
    rows = [FirstTokenRow(thread_label("run.c", threads), "run.c", pinned([str(run), str(model)] + tail, cores),
                          threads),
            FirstTokenRow("llmtp generate (in process)", "", pinned(generate, cores), 0)]
    if config.n_heads >= 2:
        rows.append(FirstTokenRow("llmtp generate --workers 2", "", pinned(generate + ["--workers", "2"], cores), 0))
    return rows
