"""run_parallel: results in input order, largest-first scheduling, errors after the pool drained;
HelpBoard: a waiting thread joins the work."""

from __future__ import annotations

import threading
import time

import pytest

from coral_torch.parallel import HelpBoard, run_parallel


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


def test_help_with_nothing_posted_returns_at_once():
    board = HelpBoard()
    assert board.help() == 0 and board.items_helped == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_helper_takes_items_of_a_posted_job(workers):
    """The owner's threads and a helper thread share one queue; results stay in input order."""
    board = HelpBoard()
    done_by: dict[int, str] = {}
    helper_ready = threading.Event()

    def work(x: int) -> int:
        name = threading.current_thread().name
        done_by[x] = name
        if name != "helper":
            helper_ready.wait(5)
            time.sleep(0.01)  # the owner's threads are slow (a low-priority save)
        return -x

    results: list = []
    owner = threading.Thread(target=lambda: results.append(run_parallel(work, range(30), workers, board=board)))
    owner.start()

    def helper() -> None:
        helper_ready.set()
        while owner.is_alive():
            if not board.help():
                time.sleep(0.001)

    h = threading.Thread(target=helper, name="helper")
    h.start()
    owner.join(10)
    h.join(10)
    assert results == [[-x for x in range(30)]]
    helped = sum(1 for n in done_by.values() if n == "helper")
    assert helped == board.items_helped and helped > 10  # the fast helper did most of the work
    assert board.help() == 0  # the job is unposted once finished


def test_an_error_in_a_helped_item_is_raised_by_the_owner():
    board = HelpBoard()
    posted = threading.Event()
    errors: list = []

    def work(x: int) -> int:
        posted.set()
        if threading.current_thread().name == "helper" and x > 2:
            raise KeyError(f"item {x}")
        time.sleep(0.01)
        return x

    def own() -> None:
        try:
            run_parallel(work, range(20), 1, board=board)
        except KeyError as exc:
            errors.append(exc)

    owner = threading.Thread(target=own)
    owner.start()
    posted.wait(5)
    h = threading.Thread(target=board.help, name="helper")
    h.start()
    h.join(10)
    owner.join(10)
    assert len(errors) == 1 and "item" in str(errors[0])
