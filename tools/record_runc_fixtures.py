"""Record what llama2.c's run.c prints for the tests' own llama2.c models, as fixtures.

    python tools/record_runc_fixtures.py /path/to/run

The binary is built by you from llama2.c's run.c, outside this repository (nothing of
llama2.c is committed here). The fixture holds run.c's stdout bytes (hex) for every run in
tests/charvocab.py's RUNS, and the sha256 of the model and tokenizer files they came from,
so a test can tell that it rebuilt the same files."""

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import charvocab  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "runc_charvocab.json"
STORIES_FIXTURE = ROOT / "tests" / "fixtures" / "runc_stories260K.json"
STORIES = ROOT.parent / "shared" / "models" / "stories260K"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record(run_binary: str, model: Path, tokenizer: Path, runs: list, steps: int, fixture: Path) -> None:
    outputs = []
    for prompt, temperature, seed in runs:
        command = [run_binary, str(model), "-z", str(tokenizer), "-t", str(temperature), "-s", str(seed),
                   "-n", str(steps), "-i", prompt]
        stdout = subprocess.run(command, capture_output=True, check=True, timeout=60).stdout
        outputs.append({"prompt": prompt, "temperature": temperature, "seed": seed, "steps": steps,
                        "stdout_hex": stdout.hex()})
    document = {"made_by": "tools/record_runc_fixtures.py with run.c of llama2.c commit 350e04f",
                "model_sha256": sha256(model), "tokenizer_sha256": sha256(tokenizer), "runs": outputs}
    fixture.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {fixture}")


def main(run_binary: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        model, tokenizer = charvocab.write_char_model(Path(folder))
        record(run_binary, model, tokenizer, charvocab.RUNS, charvocab.STEPS, FIXTURE)
    if (STORIES / "stories260K.bin").exists():
        record(run_binary, STORIES / "stories260K.bin", STORIES / "tok512.bin", charvocab.STORIES_RUNS, 256,
               STORIES_FIXTURE)


if __name__ == "__main__":
    main(sys.argv[1])
