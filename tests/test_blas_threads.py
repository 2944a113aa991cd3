"""The BLAS thread count follows the steps' times, and never changes a number."""

import os
import subprocess
import sys

import numpy as np
import pytest

from llmtp.common.model import blas_threads
from llmtp.common.model.blas_threads import FIRST_PROBE_EVERY, HISTORY, QUIET_LOOK_EVERY, BlasThreads


class FakeBlas:
    """Stands in for a threadpoolctl controller: remembers what it was set to."""

    def __init__(self, num_threads):
        self.num_threads = num_threads
        self.settings = []

    def set_num_threads(self, count):
        self.num_threads = count
        self.settings.append(count)


def run_steps(threads, seconds_for, n_steps):
    """n_steps decode steps that 'take' seconds_for(thread count) each; returns the counts used."""
    used = []
    for _ in range(n_steps):
        count = threads.current
        probing = threads.steps_since_probe >= threads.probe_every
        if probing:
            count = 1 if threads.current == threads.most else threads.most
        threads.record(count, seconds_for(count), probing)
        used.append(count)
    return used


def test_keeps_every_core_while_they_are_faster_and_backs_off_its_tries():
    threads = BlasThreads(most=2, libraries=[FakeBlas(2)], busy_now=False)
    used = run_steps(threads, {2: 0.025, 1: 0.040}.get, 400)
    assert threads.current == 2
    tries = [i for i, count in enumerate(used) if count == 1]
    assert tries[0] == HISTORY  # tried as soon as there was a median to beat
    gaps = np.diff(tries)
    assert gaps[0] == FIRST_PROBE_EVERY + 1 and gaps[-1] > gaps[0]  # losing tries come ever less often
    assert len(tries) < 10


def test_moves_to_one_thread_when_a_core_is_taken_and_back_when_it_is_free():
    blas = FakeBlas(2)
    threads = BlasThreads(most=2, libraries=[blas], busy_now=False)
    run_steps(threads, {2: 0.025, 1: 0.040}.get, 20)
    run_steps(threads, {2: 0.300, 1: 0.045}.get, 200)  # another process took a core
    assert threads.current == 1 and blas.num_threads == 1
    run_steps(threads, {2: 0.025, 1: 0.040}.get, 400)  # and let it go
    assert threads.current == 2 and blas.num_threads == 2


def test_back_to_every_core_as_soon_as_the_process_that_took_one_is_gone(monkeypatch):
    """A bench's quiet rows after its busy ones: the backed-off schedule alone left them on one
    thread. A process seen running when the chooser moved to one thread is looked for every
    QUIET_LOOK_EVERY steps; once it is gone, the next step tries every core."""
    running = [0]
    monkeypatch.setattr(blas_threads, "others_running", lambda: running[0])
    blas = FakeBlas(2)
    threads = BlasThreads(most=2, libraries=[blas], busy_now=False)
    run_steps(threads, {2: 0.025, 1: 0.040}.get, 20)
    running[0] = 1
    run_steps(threads, {2: 0.300, 1: 0.045}.get, 300)  # long enough for the tries to back off
    assert threads.current == 1 and threads.probe_every > QUIET_LOOK_EVERY + 1
    running[0] = 0
    run_steps(threads, {2: 0.025, 1: 0.040}.get, QUIET_LOOK_EVERY + 1)
    assert threads.current == 2 and blas.num_threads == 2


def test_a_core_taken_by_no_process_seen_gets_only_the_scheduled_tries(monkeypatch):
    """Another VM's load is not in /proc/loadavg: then nothing tells the chooser it has gone, and
    every try of two threads costs a slow step, so only the backed-off schedule tries."""
    monkeypatch.setattr(blas_threads, "others_running", lambda: 0)
    threads = BlasThreads(most=2, libraries=[FakeBlas(2)], busy_now=False)
    run_steps(threads, {2: 0.025, 1: 0.040}.get, 20)
    used = run_steps(threads, {2: 0.300, 1: 0.045}.get, 400)
    assert threads.current == 1 and used.count(2) < 12


def test_the_decode_steps_just_after_a_prefill_are_not_timed(monkeypatch):
    """The first decode step after a 128-token prefill took 5-7x the next (OpenBLAS's threads
    spinning down): timed, it let a one-thread try win and keep the engine there."""
    monkeypatch.setattr(blas_threads, "others_running", lambda: 0)
    assert blas_threads.SETTLE_STEPS >= 1
    threads = BlasThreads(most=2, libraries=[FakeBlas(2)], busy_now=False)
    with threads.step(blas_threads.DECODE_ROWS + 1):
        pass
    for _ in range(blas_threads.SETTLE_STEPS):
        with threads.step(1):
            pass
    assert not threads.times[2] and threads.steps_since_probe == 0
    with threads.step(1):
        pass
    assert len(threads.times[2]) == 1


def test_one_core_or_no_blas_library_leaves_the_count_alone():
    assert not BlasThreads(most=1, libraries=[FakeBlas(1)]).adaptive
    assert not BlasThreads(most=2, libraries=[]).adaptive
    assert BlasThreads(most=4, libraries=[FakeBlas(2)]).most == 2  # the environment's count is the ceiling


def test_switching_is_off_when_asked(monkeypatch):
    monkeypatch.setenv("LLMTP_ADAPTIVE_THREADS", "0")
    assert not BlasThreads(most=2, libraries=[FakeBlas(2)], busy_now=False).adaptive


def test_products_are_bit_identical_on_one_thread_and_on_every_core():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if blas_threads.usable_cores() < 2:
        pytest.skip("one usable core: nothing to compare")
    from model_factory import make_config
    from llmtp.common.model.random_weights import random_weights
    from llmtp.common.model.split import full_slice
    from llmtp.common.model.transformer import SliceModel, StepSequence
    config = make_config(dim=256, hidden_dim=640, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=500, seq_len=64)
    weights = random_weights(config, seed=3)
    x = weights.embed(np.arange(1, 30))

    def logits(count):
        model = SliceModel(config, full_slice(config), weights.as_shard())
        with threadpoolctl.threadpool_limits(count, user_api="blas"):
            model.blas_threads.libraries = []  # hold the count this test set
            out = [model.forward(x[:20], [StepSequence(0, 0, 20)], all_logits=True)]
            out += [model.forward(x[p:p + 1], [StepSequence(0, p, 1)]) for p in range(20, 29)]
        return out

    assert all(np.array_equal(a, b) for a, b in zip(logits(1), logits(2)))


def test_starts_on_one_thread_when_another_process_is_running_now():
    blas = FakeBlas(2)
    threads = BlasThreads(most=2, libraries=[blas], busy_now=True)
    assert threads.current == 1 and blas.num_threads == 1
    run_steps(threads, {2: 0.025, 1: 0.040}.get, 60)  # it was only a moment: every core again
    assert threads.current == 2


def test_a_prefill_runs_on_one_thread_while_another_process_runs(monkeypatch):
    blas = FakeBlas(2)
    threads = BlasThreads(most=2, libraries=[blas], busy_now=False)
    monkeypatch.setattr(blas_threads, "others_running", lambda: 1)
    with threads.step(128):
        assert blas.num_threads == 1
    assert blas.num_threads == 2 and threads.current == 2  # the decode's choice is kept
    monkeypatch.setattr(blas_threads, "others_running", lambda: 0)
    with threads.step(128):
        assert blas.num_threads == 2
    assert threads.steps_since_probe == 0  # prefills are not timed


def test_own_running_threads_counts_at_least_the_caller():
    assert blas_threads.own_running_threads() >= 1
    assert blas_threads.others_running() >= 0


def test_each_step_runs_on_its_own_choosers_count_when_another_chooser_moved_it(monkeypatch):
    monkeypatch.setattr(blas_threads, "others_running", lambda: 0)  # the prefill's own rule aside
    blas = FakeBlas(2)  # one library, as in a process holding two engines (the bench)
    quiet = BlasThreads(most=2, libraries=[blas], busy_now=False)
    BlasThreads(most=2, libraries=[blas], busy_now=True)  # the other engine starts on one thread
    assert blas.num_threads == 1 and quiet.current == 2
    with quiet.step(1):
        assert blas.num_threads == 2
    with quiet.step(128):
        assert blas.num_threads == 2


def test_a_sudden_slowdown_tries_the_other_count_at_once_whatever_the_backoff():
    blas = FakeBlas(2)
    threads = BlasThreads(most=2, libraries=[blas], busy_now=False)
    run_steps(threads, {2: 0.025, 1: 0.040}.get, 600)  # quiet for long: tries have backed off
    assert threads.probe_every > FIRST_PROBE_EVERY
    used = run_steps(threads, {2: 0.100, 1: 0.045}.get, 4)  # another process takes a core
    assert used == [2, 2, 1, 1] and threads.current == 1 and blas.num_threads == 1


def test_one_slow_step_alone_does_not_try_early():
    threads = BlasThreads(most=2, libraries=[FakeBlas(2)], busy_now=False)
    run_steps(threads, {2: 0.025, 1: 0.040}.get, 600)
    before = threads.steps_since_probe
    run_steps(threads, {2: 0.100, 1: 0.040}.get, 1)
    assert threads.steps_since_probe == before + 1 and threads.current == 2


@pytest.mark.parametrize("users_value", [None, "25"])
def test_llmtp_processes_let_idle_openblas_threads_sleep_soon(users_value):
    # OpenBLAS reads the variable once, when numpy loads it: importing llmtp first must set it
    env = {name: value for name, value in os.environ.items() if name != "OPENBLAS_THREAD_TIMEOUT"}
    if users_value is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = users_value
    probe = "import llmtp.coordinator.cli, os; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    shown = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == (users_value or "20")
