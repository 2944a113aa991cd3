"""Record what llama2.c's runq.c prints for stories260K converted to version 2, as a fixture.

    python tools/record_runq_fixtures.py /path/to/runq

Build runq yourself from llama2.c's runq.c outside this repository (nothing of llama2.c is
committed here), with `gcc -O3 -o runq runq.c -lm` (its Makefile's `runq` target): that build
rounds as the C source says. (-Ofast -march=native fuses multiply-adds and reorders sums; its
greedy text for this file parts from the -O3 one after about 100 tokens.) The v2 file is
written by llmtp's own converter (default group size); the fixture keeps its sha256 so the
test can tell it rebuilt the same file."""

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "runq_stories260K.json"
STORIES = ROOT.parent / "shared" / "models" / "stories260K"
PROMPTS = ["Once upon a time", "Lily and Tom", ""]
STEPS = 256


def main(runq_binary: str) -> None:
    from llmtp.common.formats.checkpoint import convert_checkpoint

    with tempfile.TemporaryDirectory() as folder:
        model = Path(folder) / "stories260K_v2.bin"
        checkpoint = convert_checkpoint(STORIES / "stories260K.bin", model, version=2)
        runs = []
        for prompt in PROMPTS:
            command = [runq_binary, str(model), "-z", str(STORIES / "tok512.bin"), "-t", "0", "-n", str(STEPS),
                       "-i", prompt]
            stdout = subprocess.run(command, capture_output=True, check=True, timeout=120).stdout
            runs.append({"prompt": prompt, "steps": STEPS, "stdout_hex": stdout.hex()})
        document = {"made_by": "tools/record_runq_fixtures.py with runq.c of llama2.c commit 350e04f, gcc -O3",
                    "group_size": checkpoint.group_size,
                    "model_sha256": hashlib.sha256(model.read_bytes()).hexdigest(), "runs": runs}
    FIXTURE.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    main(sys.argv[1])
