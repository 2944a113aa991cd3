"""Record what llama2.c's runq.c prints for stories260K converted to version 2, as a fixture.

    python tools/record_runq_fixtures.py /path/to/runq

Also records tests/fixtures/runq_random_v2.json: runq.c on the random v2 files of
tests/runq_models.py (group sizes 32 and 64), made by llmtp's writer.

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
RANDOM_FIXTURE = ROOT / "tests" / "fixtures" / "runq_random_v2.json"
RANDOM_GROUP_SIZES = (32, 64)
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
    record_random(runq_binary)


def run_runq(runq_binary: str, model: Path, prompt: str, steps: int) -> bytes:
    command = [runq_binary, str(model), "-z", str(STORIES / "tok512.bin"), "-t", "0", "-n", str(steps), "-i", prompt]
    return subprocess.run(command, capture_output=True, check=True, timeout=120).stdout


def record_random(runq_binary: str) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from runq_models import PROMPT, STEPS, write_random_v2

    models = []
    with tempfile.TemporaryDirectory() as folder:
        for group_size in RANDOM_GROUP_SIZES:
            model = write_random_v2(Path(folder), group_size)
            models.append({"group_size": group_size, "model_sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
                           "prompt": PROMPT, "steps": STEPS,
                           "stdout_hex": run_runq(runq_binary, model, PROMPT, STEPS).hex()})
    document = {"made_by": "tools/record_runq_fixtures.py with runq.c of llama2.c commit 350e04f, gcc -O3",
                "models": models}
    RANDOM_FIXTURE.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {RANDOM_FIXTURE}")


if __name__ == "__main__":
    main(sys.argv[1])
