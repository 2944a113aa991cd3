"""`bench --llama2c`: llmtp's rows against llama2.c's, as the ratios issues 15 and 17 name.

Each llmtp row is divided by the llama2.c row of the same weights (float32 against run.c, the
version 2 copy against runq.c) and the same contention state that ran on the most cores not
above its own: 1 worker (one pinned core) against 1 thread, 2 workers and in process against 2
threads. Times to first token are divided by run.c's with 2 threads."""

from .contention import is_contended
from .hf import HF_LABEL
from .results import BenchReport, EngineResult, Ratio

FAMILY = {"": "run.c", "v2": "runq.c"}  # an llmtp row's variant -> the program measured on the same file


def llama2c_ratios(report: BenchReport) -> list[Ratio]:
    ratios = []
    theirs = [r for r in report.results if r.program]
    for ours in (r for r in report.results if not r.program and r.engine != HF_LABEL and r.variant in FAMILY):
        twin = counterpart(ours, theirs)
        if twin is not None:
            name = f"{ours.engine} / {twin.engine}"
            ratios += [Ratio(name, "decode", ours.decode_tokens_per_s / twin.decode_tokens_per_s),
                       Ratio(name, "prefill", ours.prefill_tokens_per_s / twin.decode_tokens_per_s)]
    runc = {is_contended(r): r for r in report.first_token if r.program == "run.c"}
    for ours in (r for r in report.first_token if not r.program):
        twin = runc.get(is_contended(ours))
        if twin is not None:
            ratios.append(Ratio(f"{ours.engine} / {twin.engine}", "time to first token", ours.seconds / twin.seconds))
    return ratios


def counterpart(ours: EngineResult, theirs: list[EngineResult]) -> EngineResult | None:
    """The program row of `ours`'s file and contention state on the most cores <= ours'."""
    candidates = [r for r in theirs if r.program == FAMILY[ours.variant] and r.cores <= ours.cores
                  and is_contended(r) == is_contended(ours)]
    return max(candidates, key=lambda r: r.cores, default=None)


def llama2c_lines(report: BenchReport) -> list[str]:
    if not report.llama2c_counting and not report.first_token:
        return []
    lines = ["", f"llama2.c (P = {report.prompt_tokens} prompt tokens, D = {report.decode_tokens} decoded): "
                 + report.llama2c_counting]
    lines += [f"{r.name}: {r.measure} {r.value:.2f}x" for r in report.ratios if r.measure == "decode"]
    prefill = [f"{r.name} {r.value:.1f}x" for r in report.ratios if r.measure == "prefill"]
    if prefill:
        lines.append("prefill (llmtp's batched prompt against llama2.c's per-forward rate): " + "; ".join(prefill))
    if report.first_token:
        lines += ["", "time to first token: the wall time of a whole process, -n 6 on a 5-token prompt, "
                      "imports included (best round)"]
        lines += [f"  {r.engine:<44}{r.seconds:>8.2f} s" for r in report.first_token]
        lines += [f"{r.name}: time to first token {r.value:.2f}x" for r in report.ratios
                  if r.measure == "time to first token"]
    return lines
