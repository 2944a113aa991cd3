"""`llmtp bench --serve`: aggregate decode tokens/s of serve's continuous-batching scheduler at
1, 4 and 8 concurrent streams, on the engines `llmtp serve` opens (in this process, N workers).

The scheduler is driven directly, without HTTP: what batching buys is the step, and an HTTP
client in this process would take cores from the engine on a small machine. Each stream has
its own random prompt; a run's decode rate is counted over the window in which every stream
is decoding (from the last stream's first token to the first stream's end), so prefill and
stragglers do not blur it. The random-weight model has no tokenizer: the streams carry token
ids only (decoding text costs microseconds a token, the step tens of milliseconds)."""

import json
import queue
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llmtp.common.errors import ConfigError

from ..serve.scheduler import Finished, Rejected, SamplingParams, Scheduler, TextDelta

DEFAULT_STREAMS = (1, 4, 8)
WAIT_S = 600.0  # the longest one run may take before the bench gives up on it


class _IdsOnly:
    """The scheduler's tokenizer for a model without one: every piece is empty text."""

    class _Decoder:
        def push(self, token_id: int) -> str:
            return ""

        def flush(self) -> str:
            return ""

    def stream_decoder(self, previous_id=None):
        return self._Decoder()


@dataclass
class ServeRow:
    engine: str
    streams: int
    decode_tokens_per_s: float  # all streams together, over the window all were decoding
    per_stream_tokens_per_s: float
    window_tokens: int


@dataclass
class ServeReport:
    model: str
    prompt_tokens: int
    decode_tokens: int
    rows: list[ServeRow] = field(default_factory=list)

    def ratio(self, engine: str, streams: int) -> float | None:
        by_streams = {row.streams: row.decode_tokens_per_s for row in self.rows if row.engine == engine}
        if 1 not in by_streams or streams not in by_streams or not by_streams[1]:
            return None
        return by_streams[streams] / by_streams[1]


def measure_streams(scheduler: Scheduler, vocab_size: int, n_streams: int, prompt_tokens: int,
                    decode_tokens: int, seed: int) -> tuple[float, int]:
    """(aggregate decode tokens/s, tokens counted) of n_streams greedy streams run together."""
    rng = np.random.default_rng(seed)
    events: queue.Queue = queue.Queue()
    params = SamplingParams(max_tokens=decode_tokens, temperature=0.0)
    for index in range(n_streams):
        prompt = [1] + rng.integers(3, vocab_size, prompt_tokens - 1).tolist()  # BOS, then no BOS/EOS
        scheduler.submit(prompt, params, lambda event, index=index: events.put((index, time.perf_counter(), event)),
                         queue_timeout=WAIT_S)
    token_times: list[list[float]] = [[] for _ in range(n_streams)]
    finished = 0
    deadline = time.monotonic() + WAIT_S
    while finished < n_streams:
        try:
            index, at, event = events.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise ConfigError(f"bench --serve: {n_streams} streams did not finish within {WAIT_S:.0f} s") from None
        if isinstance(event, TextDelta) and event.token_id >= 0:
            token_times[index].append(at)
        elif isinstance(event, Rejected):
            raise ConfigError(f"bench --serve: a stream was refused: {event.message}")
        elif isinstance(event, Finished):
            if event.reason == "error":
                raise ConfigError(f"bench --serve: a stream failed: {event.error}")
            finished += 1
    start = max(times[0] for times in token_times)
    end = min(times[-1] for times in token_times)
    counted = sum(1 for times in token_times for at in times if start < at <= end)
    return (counted / (end - start) if end > start else 0.0), counted


def run_serve_bench(model: str, checkpoint_path: Path, worker_counts: list[int], prompt_tokens: int,
                    decode_tokens: int, rounds: int, streams: tuple[int, ...] = DEFAULT_STREAMS) -> ServeReport:
    """worker_counts: 0 is in this process. Every engine is opened as serve opens it, with as
    many slots as the most streams; each row keeps its best of `rounds`."""
    from ..commands.engines import DEFAULT_MODEL_DIR, EngineOptions, plan_engine

    report = ServeReport(model, prompt_tokens, decode_tokens)
    for n_workers in worker_counts:
        label = "in-process" if n_workers == 0 else f"{n_workers} worker{'s' if n_workers > 1 else ''}"
        # plan_engine wants a tokenizer path; the bundled one is named and never opened (see _IdsOnly)
        plan = plan_engine(EngineOptions(checkpoint=str(checkpoint_path), workers=n_workers,
                                         tokenizer=str(DEFAULT_MODEL_DIR / "tokenizer.model")))
        if prompt_tokens + decode_tokens > plan.config.seq_len:
            raise ConfigError(f"--prompt-tokens + --decode-tokens = {prompt_tokens + decode_tokens} exceeds "
                              f"the model's context {plan.config.seq_len}")
        print(f"bench --serve: opening {label} with {max(streams)} slots", file=sys.stderr)
        engine = plan.open(max(streams))
        scheduler = Scheduler(engine, _IdsOnly(), prefill_chunk=prompt_tokens * max(streams))
        try:
            best: dict[int, tuple[float, int]] = {}
            for round_number in range(rounds):  # interleaved, so a spell of noise hits every count alike
                for n_streams in streams:
                    measured = measure_streams(scheduler, plan.config.vocab_size, n_streams, prompt_tokens,
                                               decode_tokens, seed=round_number * 100 + n_streams)
                    print(f"bench --serve: {label}, round {round_number + 1}/{rounds}, {n_streams} streams: "
                          f"{measured[0]:.1f} tok/s", file=sys.stderr)
                    best[n_streams] = max(best.get(n_streams, (0.0, 0)), measured)
        finally:
            scheduler.close()
            engine.close()
        for n_streams in streams:
            rate, counted = best[n_streams]
            report.rows.append(ServeRow(label, n_streams, rate, rate / n_streams, counted))
    return report


def format_serve_report(report: ServeReport) -> str:
    lines = [f"serve bench: {report.model}, {report.prompt_tokens}-token prompts, up to {report.decode_tokens} "
             f"tokens a stream, greedy",
             f"{'engine':<12} {'streams':>7} {'decode tok/s':>13} {'per stream':>11}"]
    for row in report.rows:
        lines.append(f"{row.engine:<12} {row.streams:>7} {row.decode_tokens_per_s:>13.1f} "
                     f"{row.per_stream_tokens_per_s:>11.1f}")
    for engine in dict.fromkeys(row.engine for row in report.rows):
        most = max(row.streams for row in report.rows if row.engine == engine)
        ratio = report.ratio(engine, most)
        if ratio is not None and most > 1:
            lines.append(f"{engine}: {most} streams / 1 stream: {ratio:.2f}x aggregate decode")
    return "\n".join(lines)


def save_serve_report(report: ServeReport, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-serve-{report.model}.json"
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(asdict(report), indent=2))
    partial.replace(path)
    return path


def run_from_args(args, model: str, checkpoint_path: Path) -> int:
    """`llmtp bench --serve [WORKERS]`, after bench has resolved the model."""
    try:
        worker_counts = [int(n) for n in args.serve.split(",") if n.strip()]
    except ValueError:
        raise ConfigError(f"--serve takes comma-separated worker counts (0 = in-process), got {args.serve!r}") from None
    if not worker_counts or min(worker_counts) < 0:
        raise ConfigError(f"--serve takes worker counts of 0 or more, got {args.serve!r}")
    report = run_serve_bench(model, checkpoint_path, worker_counts, args.prompt_tokens, args.decode_tokens,
                             args.rounds)
    print(format_serve_report(report))
    print(f"\nwrote {save_serve_report(report, Path(args.out))}")
    return 0
