"""The bench report as a table (format_report) and as JSON (save_report / load_report)."""

import json
from dataclasses import asdict
from pathlib import Path

from .contention import contention_lines, is_contended
from .plot import plot_report
from .llama2c_report import llama2c_lines
from .results import BenchReport, EngineResult, FirstTokenResult, MachineLimits, Ratio


def format_rate(value: float) -> str:
    """Three significant digits, so that a small kernel's rate never prints as 0."""
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def format_report(report: BenchReport) -> str:
    streams = ", ".join(f"{gbs:.1f} GB/s on {n} core{'s' if n > 1 else ''}"
                        for n, gbs in sorted(report.limits.bandwidth_gbs.items()))
    lines = [
        f"model {report.model}: {report.weight_mb_per_token:.1f} MB of weights per decoded token",
        f"machine: {report.limits.cores} cores; a matrix-vector product streams {streams}; "
        f"ZeroMQ round trip {report.limits.zmq_round_trip_ms * 1000:.0f} us",
        "limit = weights / what the row's cores stream (in-process and transformers use every core)",
        "",
        f"{'engine':<22}{'cores':>6}{'MB/tok':>8}{'prefill tok/s':>14}{'decode tok/s':>13}{'limit':>8}{'% of limit':>11}"
        f"{'step ms':>9}{'math':>8}{'sync':>8}{'coord':>8}{'per sync us':>12}{'sync/RTT':>9}"
        f"{'peak RSS - shard - kv MB':>26}",
    ]
    for r in report.results:
        per_sync = f"{r.sync_ms * 1000:.0f}" if r.sync_ms else "-"
        ratio = f"{r.sync_ms / report.limits.zmq_round_trip_ms:.2f}" if r.sync_ms else "-"
        overhead = ", ".join(f"{rss - shard - kv:.0f}" for rss, shard, kv in
                             zip(r.worker_peak_rss_mb, r.worker_shard_mb, r.worker_kv_mb)) or "-"
        mb = _mb(report, r)
        lines.append(f"{r.engine:<22}{r.cores:>6}{mb:>8.1f}{r.prefill_tokens_per_s:>14.1f}{r.decode_tokens_per_s:>13.2f}"
                     f"{report.limit_of(r):>8.1f}{100 * report.share_of_limit(r):>10.0f}%"
                     f"{r.decode_step_ms:>9.2f}{r.math_ms:>8.2f}{r.sync_wait_ms:>8.2f}{r.coordinator_ms:>8.2f}"
                     f"{per_sync:>12}{ratio:>9}{overhead:>26}")
    lines += scaling_lines(report) + quant_lines(report) + contention_lines(report) + llama2c_lines(report)
    if report.gemm_gflops:
        config = report.config
        kernels = ", ".join(f"{library} {format_rate(gflops)} GFLOPS"
                            for library, gflops in report.gemm_gflops.items())
        ratio = (f" (numpy / torch {report.gemm_gflops['numpy'] / report.gemm_gflops['torch']:.2f}x)"
                 if "torch" in report.gemm_gflops else "")
        lines += ["", f"prefill's kernel, ({report.prompt_tokens} x {config['dim']}) @ "
                      f"({config['dim']} x {config['hidden_dim']}) on {report.limits.cores} cores: {kernels}{ratio}"]
    return "\n".join(lines)


def quant_lines(report: BenchReport) -> list[str]:
    """`bench --quant`: each quantized row against the source's row of the same engine, and each
    quantization's worker rows against its own in-process row."""
    ours = [r for r in report.results if not r.program]  # llama2.c's rows: llama2c_report.py
    source = {r.engine: r for r in ours if not r.variant}
    alone = {r.variant: r for r in ours if r.variant and r.n_workers == 0}
    lines = []
    for r in (r for r in ours if r.variant):
        base = source.get(r.engine.removesuffix(f" {r.variant}"))
        if base is not None:
            lines.append(f"{r.engine} / {base.engine}: decode {r.decode_tokens_per_s / base.decode_tokens_per_s:.2f}x, "
                         f"prefill {r.prefill_tokens_per_s / base.prefill_tokens_per_s:.2f}x, bytes per token "
                         f"{_mb(report, r) / _mb(report, base):.3f}x; {100 * report.share_of_limit(r):.0f}% of its "
                         f"own limit")
    for r in (r for r in ours if r.variant and r.n_workers > 1 and r.variant in alone):
        lines.append(f"{r.engine} / {alone[r.variant].engine}: decode "
                     f"{r.decode_tokens_per_s / alone[r.variant].decode_tokens_per_s:.2f}x")
    return [""] + lines if lines else []


def _mb(report: BenchReport, result) -> float:
    return result.weight_mb_per_token or report.weight_mb_per_token


def scaling_lines(report: BenchReport) -> list[str]:
    """Each worker count's decode speed against one worker's, beside the same ratio of limits."""
    workers = {r.n_workers: r for r in report.results if r.n_workers > 0 and not is_contended(r) and not r.variant}
    if 1 not in workers or len(workers) < 2:
        return []
    one = workers[1]
    lines = [""]
    for n, r in sorted(workers.items()):
        if n > 1:
            limits = report.bandwidth_limit_tokens_per_s(r.cores) / report.bandwidth_limit_tokens_per_s(one.cores)
            lines.append(f"{n} workers / 1 worker: decode {r.decode_tokens_per_s / one.decode_tokens_per_s:.2f}x, "
                         f"prefill {r.prefill_tokens_per_s / one.prefill_tokens_per_s:.2f}x "
                         f"(their limits: {limits:.2f}x)")
    return lines


def load_report(path: Path) -> BenchReport:
    """A report written by save_report, e.g. to draw its plot again."""
    data = json.loads(Path(path).read_text())
    limits = data.pop("limits")
    limits["bandwidth_gbs"] = {int(cores): gbs for cores, gbs in limits["bandwidth_gbs"].items()}
    results = [EngineResult(**row) for row in data.pop("results")]
    first_token = [FirstTokenResult(**row) for row in data.pop("first_token", [])]
    ratios = [Ratio(**row) for row in data.pop("ratios", [])]
    return BenchReport(limits=MachineLimits(**limits), results=results, first_token=first_token, ratios=ratios,
                       **data)


def save_report(report: BenchReport, out_dir: Path) -> tuple[Path, Path | None]:
    """JSON (through a temporary name) and, with matplotlib, a PNG beside it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{report.model}"
    json_path = out_dir / f"{stem}.json"
    partial = json_path.with_name(json_path.name + ".partial")
    partial.write_text(json.dumps(asdict(report), indent=2))
    partial.replace(json_path)
    png_path = out_dir / f"{stem}.png"
    return json_path, png_path if plot_report(report, png_path) else None
