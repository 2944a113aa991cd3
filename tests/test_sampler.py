"""The sampler against run.c's own sampler code, compiled from tests/oracles/runc_sampler.c."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from llmtp.common.model.sampler import Sampler, SamplerConfig, XorShiftRng

ORACLE_SOURCE = Path(__file__).parent / "oracles" / "runc_sampler.c"


@pytest.fixture(scope="module")
def runc_sampler(tmp_path_factory):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build run.c's sampler oracle")
    binary = tmp_path_factory.mktemp("oracle") / "runc_sampler"
    subprocess.run([compiler, "-O0", "-o", str(binary), str(ORACLE_SOURCE), "-lm"], check=True)

    def run(cases):
        lines = []
        for seed, temperature, topp, logits in cases:
            values = " ".join(float(v).hex() for v in logits.astype(np.float32))
            lines.append(f"{seed} {temperature!r} {topp!r} {len(logits)} {values}")
        out = subprocess.run([str(binary)], input="\n".join(lines) + "\n", capture_output=True, text=True,
                             check=True).stdout
        return [[int(v) for v in line.split()] for line in out.splitlines()]
    return run


def make_cases():
    rng = np.random.default_rng(7)
    cases = []
    for case in range(300):
        n = int(rng.choice([2, 5, 64, 512, 32000]))
        spread = float(rng.choice([0.5, 3.0, 8.0]))
        logits = (rng.standard_normal(n) * spread).astype(np.float32)
        if case % 10 == 0:
            logits[: n // 2] = logits[0]  # ties: run.c's qsort order must be reproduced
        temperature = float(rng.choice([0.0, 0.5, 1.0, 1.3]))
        topp = float(rng.choice([0.0, 0.5, 0.9, 0.95, 1.0]))
        seed = int(rng.integers(1, 2**63))
        cases.append((seed, temperature, topp, logits))
    return cases


def test_matches_runc_sampler(runc_sampler):
    cases = make_cases()
    expected = runc_sampler(cases)
    for (seed, temperature, topp, logits), want in zip(cases, expected):
        sampler = Sampler(SamplerConfig(temperature=temperature, topp=topp, seed=seed))
        got = [sampler.sample(logits.copy()) for _ in range(3)]
        assert got == want, (seed, temperature, topp, len(logits))


def test_xorshift_known_sequence():
    # state 1: 1 ^ (1 << 25) = 33554433, ^ (>> 27) unchanged; times the multiplier, top 32 bits
    rng = XorShiftRng(1)
    state = 1 ^ (1 << 25)
    expected = ((state * 0x2545F4914F6CDD1D) % 2**64) >> 32
    assert rng.next_u32() == expected


def test_top_k_restricts_to_k_most_likely():
    logits = np.array([5.0, 4.0, 3.0, -1.0, -2.0], dtype=np.float32)
    sampler = Sampler(SamplerConfig(temperature=1.0, topp=1.0, topk=2, seed=42))
    picks = {sampler.sample(logits) for _ in range(300)}
    assert picks == {0, 1}


def test_greedy_ignores_seed():
    logits = np.array([0.1, 2.0, 1.9], dtype=np.float32)
    assert {Sampler(SamplerConfig(temperature=0.0, seed=s)).sample(logits) for s in range(1, 20)} == {1}
