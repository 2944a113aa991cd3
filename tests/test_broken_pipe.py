"""`llmtp generate --workers 2 | head -c 50` (issue 13.8): the reader goes away mid-generation; llmtp
exits 0 at once and quietly, and still stops its workers, unlinks its shared memory (no
resource_tracker warning) and removes its run folder."""

import os
import subprocess

from cli_runner import llmtp_command


def test_a_closed_pipe_ends_generate_quietly_and_cleanly(stories260k, tmp_path):
    run_tmp = tmp_path / "tmp"  # the run folders of this llmtp only
    run_tmp.mkdir()
    command = " ".join(llmtp_command() + ["generate", str(stories260k["model"]), "-z", str(stories260k["tokenizer"]),
                                          "--workers", "2", "-n", "512", "-s", "1"])
    pipeline = subprocess.run(["bash", "-c", f"{command} 2>{tmp_path / 'stderr'} | head -c 50; "
                               "echo; echo status=${PIPESTATUS[0]}"],
                              capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, TMPDIR=str(run_tmp)))
    stderr = (tmp_path / "stderr").read_text()
    assert pipeline.stdout.startswith("Once upon a time")
    assert pipeline.stdout.rstrip().endswith("status=0"), (pipeline.stdout, stderr)
    assert stderr == "", stderr
    assert list(run_tmp.iterdir()) == []  # removed after the workers were stopped
