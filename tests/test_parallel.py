"""run_parallel: results in input order, largest-first scheduling, errors after the pool drained."""

from __future__ import annotations

import threading
import time

import pytest

from coral_torch.parallel import run_parallel


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_results_come_back_in_input_order(workers):
    items = list(range(40))
    assert run_parallel(lambda x: x * x, items, workers) == [x * x for x in items]
    assert run_parallel(lambda x: x, [], workers) == []


def test_costly_items_start_first_and_a_slow_one_does_not_block_the_rest():
    started: list[int] = []
    lock = threading.Lock()

    def work(x: int) -> int:
        with lock:
            started.append(x)
        time.sleep(0.2 if x == 0 else 0.001)
        return x

    t0 = time.perf_counter()
    out = run_parallel(work, [3, 0, 1, 2, 5, 4], 2, cost=lambda x: 100 if x == 0 else x)
    elapsed = time.perf_counter() - t0
    assert out == [3, 0, 1, 2, 5, 4]
    assert started[0] == 0  # the expensive item first
    # the other thread finished every small item while item 0 slept (no look-ahead window)
    assert elapsed < 0.2 + 0.15


def test_first_error_is_raised_after_every_started_job_ended():
    running = []

    def work(x: int) -> int:
        running.append(x)
        if x == 1:
            raise ValueError("boom")
        time.sleep(0.02)
        running.remove(x)
        return x

    with pytest.raises(ValueError, match="boom"):
        run_parallel(work, range(6), 2)
    assert running == [1]  # nothing else still running when the error surfaced
