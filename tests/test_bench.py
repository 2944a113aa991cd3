"""`llmtp bench` runs end to end and reports every field (speed itself is never asserted)."""

import json
import os

from cli_runner import run_llmtp
from model_factory import make_config, write_random_checkpoint


def test_bench_reports_every_engine(tmp_path):
    config = make_config(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=80, seq_len=64)
    checkpoint = write_random_checkpoint(tmp_path / "tiny.bin", config, seed=2)
    result = run_llmtp("bench", checkpoint, "-w", "1,2", "--prompt-tokens", 16, "--decode-tokens", 4,
                       "--probe-mib", 16, "--rounds", 2, "-o", tmp_path / "out", timeout=180)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "bench-tiny.json").read_text())
    engines = [r["engine"] for r in report["results"]]
    assert engines == ["in-process", "1 worker", "2 workers"]
    assert report["limits"]["zmq_round_trip_ms"] > 0
    assert all(gbs > 0 for gbs in report["limits"]["bandwidth_gbs"].values())
    for row in report["results"]:
        assert row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0
    two = report["results"][2]
    assert two["sync_ms"] is not None and len(two["worker_peak_rss_mb"]) == 2
    # Each worker gets one core by default, and every row's limit is measured for its cores.
    cores = len(os.sched_getaffinity(0))
    assert [r["cores"] for r in report["results"]] == [cores, 1, 2 if cores >= 2 else cores]
    assert {str(r["cores"]) for r in report["results"]} <= set(report["limits"]["bandwidth_gbs"])
    assert "2 workers / 1 worker: decode" in result.stdout
    assert report["gemm_gflops"]["numpy"] > 0 and "prefill's kernel" in result.stdout
    # The JSON holds everything the printed table came from.
    from llmtp.coordinator.bench import format_report, load_report
    assert format_report(load_report(tmp_path / "out" / "bench-tiny.json")) in result.stdout


def test_bench_needs_a_model():
    result = run_llmtp("bench")
    assert result.returncode == 2 and "checkpoint or --preset" in result.stderr


def test_rounds_keep_each_engines_best_decode_with_its_time_split_and_best_prefill():
    from llmtp.coordinator.bench import EngineResult, best_of

    def result(prefill, decode, math_ms):
        return EngineResult(engine="1 worker", n_workers=1, cores=1, prefill_tokens_per_s=prefill,
                            decode_tokens_per_s=decode, decode_step_ms=1000 / decode, math_ms=math_ms,
                            sync_wait_ms=0.0, coordinator_ms=0.0, sync_ms=None)

    kept = best_of(best_of(None, result(500, 20, 40.0)), result(400, 25, 35.0))
    assert (kept.prefill_tokens_per_s, kept.decode_tokens_per_s, kept.math_ms) == (500, 25, 35.0)
    kept = best_of(kept, result(600, 22, 30.0))
    assert (kept.prefill_tokens_per_s, kept.decode_tokens_per_s, kept.math_ms) == (600, 25, 35.0)


def test_contended_bench_times_every_row_again_beside_a_busy_core(tmp_path):
    config = make_config(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=80, seq_len=64)
    checkpoint = write_random_checkpoint(tmp_path / "tiny.bin", config, seed=2)
    result = run_llmtp("bench", checkpoint, "-w", "1", "--prompt-tokens", 8, "--decode-tokens", 4,
                       "--probe-mib", 16, "--rounds", 1, "--contended", "-o", tmp_path / "out", timeout=180)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "bench-tiny.json").read_text())
    engines = [r["engine"] for r in report["results"]]
    assert engines == ["in-process", "1 worker", "in-process, 1 core busy", "1 worker, 1 core busy"]
    assert "in-process, 1 core busy / quiet: decode" in result.stdout
    assert "1 worker, 1 core busy / quiet: decode" in result.stdout


def test_bench_quant_measures_each_format_beside_float32(tmp_path):
    config = make_config(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=80, seq_len=64)
    checkpoint = write_random_checkpoint(tmp_path / "tiny.bin", config, seed=2)
    env = {"LLMTP_CACHE_DIR": str(tmp_path / "cache")}
    result = run_llmtp("bench", checkpoint, "-w", "2", "--quant", "q8_0,q4_1", "--prompt-tokens", 16,
                       "--decode-tokens", 4, "--probe-mib", 16, "--rounds", 1, "-o", tmp_path / "out",
                       timeout=240, env_extra=env)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "bench-tiny.json").read_text())
    rows = {r["engine"]: r for r in report["results"]}
    assert list(rows) == ["in-process", "2 workers", "in-process q8_0", "2 workers q8_0", "in-process q4_1",
                          "2 workers q4_1"]
    assert [rows[e]["weights"] for e in rows] == ["f32", "f32", "q8_0", "q8_0", "q4_1", "q4_1"]
    # bytes per token from the stored matrices: 34 and 20 bytes per 32 weights against 128
    f32_mb = rows["in-process"]["weight_mb_per_token"]
    assert abs(rows["in-process q8_0"]["weight_mb_per_token"] / f32_mb - 34 / 128) < 1e-12
    assert abs(rows["2 workers q4_1"]["weight_mb_per_token"] / f32_mb - 20 / 128) < 1e-12
    assert "in-process q8_0 / in-process: decode" in result.stdout
    assert "2 workers q4_1 / in-process q4_1: decode" in result.stdout
    assert len(rows["2 workers q8_0"]["worker_peak_rss_mb"]) == 2


def test_bench_quant_refuses_an_unknown_format_in_one_line():
    result = run_llmtp("bench", "--preset", "15M", "--quant", "q8_0,q5_k")
    assert result.returncode == 2 and "--quant takes a comma list of q8_0, q4_0, q4_1" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
