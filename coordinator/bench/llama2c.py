"""`llmtp bench --llama2c DIR`: llama2.c's own engines, built by the user outside the project
(`gcc -Ofast -march=native -fopenmp run.c -lm -o DIR/run`, the same for runq.c), timed as rows of
the same interleaved rounds as llmtp's engines.

- decode rows: `run` on a version 0 file of the measured weights, `runq` on its version 2 copy,
  each with 1 and 2 OpenMP threads pinned (taskset) to the first 1 or 2 usable cores, the cores
  llmtp's 1- and 2-worker rows are pinned to; greedy (-t 0), the bench's prompt length (a text of
  that many tokens under the synthetic tokenizer, llama2c_files.py) and -n prompt + decode steps.
  The rate is the program's own "achieved tok/s" (COUNTING says what it counts).
- time to first token rows: the wall time of a whole process, imports and start-up included, as
  a user sees it: `run` with 2 threads, `llmtp generate` in process and with `--workers 2` on
  cached shards, each `-n 6` on a 5-token prompt (one token after the prompt), on the same cores.

Every process runs in a session of its own with a timeout; on the way out (done, timed out or
interrupted) its whole group is stopped (TERM, then KILL) and reaped, so nothing is left behind
(llmtp's workers also exit with their coordinator: PR_SET_PDEATHSIG)."""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from llmtp.common.errors import ConfigError

from .results import EngineResult, FirstTokenResult

PROGRAMS = {"run": "run.c", "runq": "runq.c"}  # file name in DIR -> the source it was built from
THREADS = (1, 2)
PROGRAM_TIMEOUT = 600.0  # seconds for one decode run (a contended 2-thread run.c at 110M once ran at 0.8 tok/s)
FIRST_TOKEN_TIMEOUT = 300.0
STOP_GRACE = 5.0  # seconds between TERM and KILL
FIRST_TOKEN_PROMPT_TOKENS = 5
ACHIEVED = re.compile(r"achieved tok/s:\s*(\S+)")
COUNTING = ("run.c's and runq.c's \"achieved tok/s\" counts every forward after the first, the prompt's "
            "included (they feed a prompt one token at a time, each forward the same work as a decode step): "
            "it is their decode rate over positions 1..P+D-1, and it is what their rows show as decode and "
            "prefill. llmtp's decode is its median step over positions P..P+D-1 and its prefill one batched "
            "P-token step; the ratios below divide llmtp's decode (and prefill) by that per-forward rate.")


@dataclass(frozen=True)
class Finished:
    seconds: float  # wall time from start to exit
    returncode: int
    stdout: str
    stderr: str


def find_programs(folder: Path) -> dict[str, Path]:
    """{"run.c": DIR/run, "runq.c": DIR/runq}, whichever are executable files in `folder`;
    ConfigError in one line when neither is."""
    found = {source: folder / name for name, source in PROGRAMS.items()
             if (folder / name).is_file() and os.access(folder / name, os.X_OK)}
    if not found:
        raise ConfigError(f"--llama2c {folder}: no executable 'run' or 'runq' in it (build llama2.c's with "
                          f"gcc -Ofast -march=native -fopenmp run.c -lm -o {folder / 'run'})")
    return found


def parse_achieved(stderr: str) -> float | None:
    """The last "achieved tok/s: X" run.c/runq.c printed; None when there is none or it is not a
    finite positive rate (a run too short for run.c's millisecond clock prints inf)."""
    matches = ACHIEVED.findall(stderr)
    if not matches:
        return None
    try:
        rate = float(matches[-1])
    except ValueError:
        return None
    return rate if 0 < rate < float("inf") else None


def run_program(command: list[str], env: dict, timeout: float) -> Finished | None:
    """Run to completion and time it; None after `timeout` seconds (the process group stopped)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        seconds = time.perf_counter() - started
    except subprocess.TimeoutExpired:
        return None
    finally:
        stop_group(process)
    return Finished(seconds, process.returncode, stdout, stderr)


def stop_group(process: subprocess.Popen) -> None:
    """TERM the process's session group if it is still running, KILL it after STOP_GRACE; then KILL
    whatever else is left in the group, and reap the process."""
    def signal_group(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)
    if process.poll() is None:
        signal_group(signal.SIGTERM)
        try:
            process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            pass
    signal_group(signal.SIGKILL)
    with contextlib.suppress(Exception):
        process.communicate(timeout=STOP_GRACE)
    if process.poll() is None:
        process.kill()
        process.wait()


def pinned(command: list[str], cpus: list[int]) -> list[str]:
    """`command` under taskset to `cpus` (unpinned, with a warning, where taskset is missing)."""
    if shutil.which("taskset") is None:
        print("bench: taskset not found: llama2.c rows run unpinned", file=sys.stderr)
        return command
    return ["taskset", "-c", ",".join(map(str, cpus)), *command]


def threads_env(threads: int) -> dict:
    """OpenMP's (and BLAS's) thread count set to `threads`; 0: the environment as a user's (llmtp
    generate chooses its own threads)."""
    if not threads:
        # as on a user's machine, where Python keeps the compiled modules it imports: with
        # PYTHONDONTWRITEBYTECODE set (some sandboxes and CI images) every start of an
        # editable install compiles them again, ~50 ms of a 0.3 s first token
        return {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    return dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
                MKL_NUM_THREADS=str(threads))


def thread_label(program: str, threads: int) -> str:
    return f"{program} {threads} thread{'s' if threads > 1 else ''}"


@dataclass(frozen=True)
class ProgramRow:
    """One llama2.c program at one thread count, timed once per round."""

    label: str
    program: str  # "run.c" or "runq.c"
    command: list[str]  # taskset ... DIR/run FILE -z ... -n P+D -i TEXT
    threads: int
    weights: str  # how its file stores the matrices (a Matrix type tag)
    weight_mb_per_token: float
    variant: str  # "" for run.c's file of the measured weights, "v2" for runq.c's copy

    def time(self, label_of=lambda label: label) -> EngineResult | None:
        finished = run_program(self.command, threads_env(self.threads), PROGRAM_TIMEOUT)
        label = label_of(self.label)
        rate = None if finished is None else parse_achieved(finished.stderr)
        if rate is None:
            why = f"timed out after {PROGRAM_TIMEOUT:.0f} s" if finished is None else \
                f"exited {finished.returncode} without a finite \"achieved tok/s\""
            print(f"bench: {label} {why}: no row this round", file=sys.stderr)
            return None
        step_ms = 1000.0 / rate
        return EngineResult(engine=label, n_workers=0, cores=self.threads, prefill_tokens_per_s=rate,
                            decode_tokens_per_s=rate, decode_step_ms=step_ms, math_ms=step_ms, sync_wait_ms=0.0,
                            coordinator_ms=0.0, sync_ms=None, weights=self.weights,
                            weight_mb_per_token=self.weight_mb_per_token, variant=self.variant, program=self.program)


@dataclass(frozen=True)
class FirstTokenRow:
    """A whole process generating one token after a 5-token prompt, timed once per round."""

    label: str
    program: str  # "run.c", or "" for llmtp
    command: list[str]
    threads: int  # OMP_NUM_THREADS; 0 leaves the environment's

    def time(self, label_of=lambda label: label) -> FirstTokenResult | None:
        finished = run_program(self.command, threads_env(self.threads), FIRST_TOKEN_TIMEOUT)
        label = label_of(self.label)
        if finished is None or finished.returncode != 0:
            why = f"timed out after {FIRST_TOKEN_TIMEOUT:.0f} s" if finished is None else \
                f"exited {finished.returncode}"
            print(f"bench: time to first token, {label} {why}: no row this round", file=sys.stderr)
            return None
        return FirstTokenResult(engine=label, seconds=finished.seconds, program=self.program,
                                command=" ".join(self.command))

    def check(self) -> None:
        """Run once untimed (faults the files in, caches shards and bytecode); ConfigError with the
        program's last line of stderr when it fails."""
        finished = run_program(self.command, threads_env(self.threads), FIRST_TOKEN_TIMEOUT)
        if finished is None or finished.returncode != 0:
            last = (finished.stderr.strip().splitlines() or [""])[-1] if finished else "timed out"
            raise ConfigError(f"--llama2c: {' '.join(self.command)} failed: {last or 'exit ' + str(finished.returncode)}")


def llmtp_command() -> list[str]:
    script = Path(sys.executable).parent / "llmtp"
    return [str(script)] if script.exists() else [sys.executable, "-m", "llmtp.coordinator.cli"]
