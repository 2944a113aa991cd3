"""`llmtp bench --serve` runs end to end on a tiny random model and reports every row (speed
itself is never asserted: the machine is shared)."""

import json

from cli_runner import run_llmtp
from model_factory import make_config, write_random_checkpoint


def test_bench_serve_reports_1_4_8_streams_in_process_and_on_2_workers(tmp_path):
    config = make_config(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=80, seq_len=64)
    checkpoint = write_random_checkpoint(tmp_path / "tiny.bin", config, seed=2)
    result = run_llmtp("bench", checkpoint, "--serve", "--prompt-tokens", 8, "--decode-tokens", 12,
                       "--rounds", 1, "-o", tmp_path / "out", timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "bench-serve-tiny.json").read_text())
    rows = [(row["engine"], row["streams"]) for row in report["rows"]]
    assert rows == [(engine, n) for engine in ("in-process", "2 workers") for n in (1, 4, 8)]
    assert all(row["decode_tokens_per_s"] > 0 and row["window_tokens"] > 0 for row in report["rows"])
    assert "in-process: 8 streams / 1 stream:" in result.stdout
    assert "2 workers: 8 streams / 1 stream:" in result.stdout


def test_bench_serve_refuses_bad_worker_counts(tmp_path):
    config = make_config(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=80, seq_len=64)
    result = run_llmtp("bench", write_random_checkpoint(tmp_path / "tiny.bin", config, seed=2), "--serve", "0,x")
    assert result.returncode == 2 and "--serve takes comma-separated worker counts" in result.stderr
