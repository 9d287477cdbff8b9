"""Asynchronous saving: snapshot on the training thread, commit on a background thread.

The training thread only copies tensors into reusable host buffers (pinned when the source is on
CUDA: one device-to-host copy, then a single synchronize). There is one set of buffers, reused by
every snapshot: at most one save is in flight and the next snapshot is taken only after it finished
(the repository keeps nothing of it: delta bases are read back from its packs), so an asynchronous
save holds one copy of the checkpoint, never two. Hashing, delta encoding, compression and writing
run in the background; its error is re-raised on the training thread at the next call.
"""

from __future__ import annotations

import collections
import copy
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait as wait_futures
from typing import Any

import torch

from ..checkpoint import adapters

log = logging.getLogger(__name__)

_HELP_POLL_S = 0.005  # how often a waiting thread looks for work it can take over


class SnapshotBuffers:
    """One set of reusable host buffers, keyed by each tensor's path in the checkpoint. The caller
    must not take a new snapshot while the previous one is still being read (the callback waits
    for the in-flight save first)."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}
        self.bytes_copied = 0

    def snapshot(self, obj: Any) -> Any:
        """A deep copy of ``obj`` whose tensors live in this object's buffers (CPU)."""
        bufs = self._bufs
        memo: dict[int, torch.Tensor] = {}
        any_cuda = False
        copied = 0

        def tensor_copy(t: torch.Tensor, path: str) -> torch.Tensor:
            nonlocal any_cuda, copied
            if id(t) in memo:
                return memo[id(t)]
            src = t.detach()
            if src.layout != torch.strided or src.is_nested or src.device.type == "meta":
                out = src.clone()  # (what the save then refuses, it refuses with a clear error)
            else:
                # a non-contiguous tensor keeps its strides in the snapshot, so the commit records them
                stride = adapters.kept_stride(src)
                buf = bufs.get(path)
                if (
                    buf is None
                    or buf.shape != src.shape
                    or buf.dtype != src.dtype
                    or (stride is not None and list(buf.stride()) != stride)
                    or (stride is None and not buf.is_contiguous())
                ):
                    pin = src.device.type == "cuda"
                    buf = (
                        torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=pin)
                        if stride is None
                        else torch.empty_strided(src.shape, stride, dtype=src.dtype, device="cpu", pin_memory=pin)
                    )
                    bufs[path] = buf
                buf.copy_(src, non_blocking=src.device.type == "cuda")
                any_cuda |= src.device.type == "cuda"
                copied += buf.numel() * buf.element_size()
                out = buf
                if isinstance(t, torch.nn.Parameter):
                    out = torch.nn.Parameter(buf, requires_grad=t.requires_grad)
            memo[id(t)] = out
            return out

        def walk(x: Any, path: str) -> Any:
            if isinstance(x, torch.Tensor):
                return tensor_copy(x, path)
            if isinstance(x, dict):
                out: Any = type(x)() if type(x) in (dict, collections.OrderedDict) or _is_attrdict(x) else {}
                for k, v in x.items():
                    out[k] = walk(v, f"{path}/{k}")
                if hasattr(x, "_metadata"):
                    out._metadata = copy.deepcopy(x._metadata)
                return out
            if type(x) is list:
                return [walk(v, f"{path}/{i}") for i, v in enumerate(x)]
            if type(x) is tuple:
                return tuple(walk(v, f"{path}/{i}") for i, v in enumerate(x))
            if x is None or isinstance(x, (int, float, str, bool, torch.dtype, torch.device, torch.Size)):
                return x
            try:
                return copy.deepcopy(x)
            except Exception:  # noqa: BLE001 - values that refuse deepcopy are kept by reference
                return x

        out = walk(obj, "")
        if any_cuda:
            torch.cuda.synchronize()
        self.bytes_copied = copied
        return out


def _is_attrdict(x: Any) -> bool:
    return type(x).__name__ == "AttributeDict"


def _lower_thread_priority(nice: int | str) -> None:
    """Lower this thread's CPU priority (Linux: per thread, inherited by threads it starts), so the
    training threads win the CPU and the save fills the gaps. ``nice``: a nice increment, or
    ``"idle"`` for ``SCHED_IDLE`` (run only on otherwise idle cores). Best effort elsewhere."""
    try:
        tid = threading.get_native_id()
        if nice == "idle":
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        elif isinstance(nice, int) and nice > 0:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (OSError, AttributeError):  # pragma: no cover - not permitted / not supported
        pass


class BackgroundCommitter:
    """Runs one job at a time on a background thread; errors surface on the next :meth:`check`.

    ``nice`` lowers the background thread's (and its encoder threads') CPU priority: on a CPU-bound
    trainer the save then takes idle cycles and a small share instead of slowing the training step.
    Too low a priority lets a save run into the next checkpoint, which then waits for it; the default
    (15) and the trade-off are measured with ``bench/lightning_bench.py`` (docs/benchmarks.md).
    """

    def __init__(self, nice: int | str = 15) -> None:
        self._pool = ThreadPoolExecutor(
            1, thread_name_prefix="coral-save", initializer=_lower_thread_priority, initargs=(nice,)
        )
        self._future: Future | None = None
        self._lock = threading.Lock()
        self.last_result: Any = None
        self.last_seconds: float = 0.0

    @property
    def busy(self) -> bool:
        return self._future is not None and not self._future.done()

    @property
    def pending(self) -> bool:
        """A job was submitted whose outcome nobody collected yet (running or finished)."""
        return self._future is not None

    @property
    def failed(self) -> bool:
        """The job finished with an error that nobody collected yet (:meth:`check` raises it)."""
        fut = self._future
        return fut is not None and fut.done() and fut.exception() is not None

    def submit(self, fn: Callable[[], Any]) -> None:
        self.wait()

        def run() -> Any:
            t0 = time.perf_counter()
            try:
                return fn()
            finally:
                self.last_seconds = time.perf_counter() - t0

        self._future = self._pool.submit(run)

    def check(self) -> Any:
        """Re-raise the error of a finished job; returns its result once (else None)."""
        fut = self._future
        if fut is None or not fut.done():
            return None
        self._future = None
        self.last_result = fut.result()  # raises the worker's exception here
        return self.last_result

    def wait(self, timeout: float | None = None, *, helper: Callable[[], int] | None = None) -> Any:
        """Block until the in-flight job is done; re-raise its error. ``helper`` is called while
        waiting (it returns how many work items it did; 0: nothing to do right now), so the
        waiting thread can take part in the job instead of idling."""
        fut = self._future
        if fut is None:
            return None
        deadline = None if timeout is None else time.monotonic() + timeout
        if helper is not None:
            while not fut.done() and (deadline is None or time.monotonic() < deadline):
                if not helper():
                    wait_futures([fut], timeout=_HELP_POLL_S)
        done, _ = wait_futures([fut], timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        if not done:
            raise TimeoutError(f"the background job did not finish within {timeout} s")
        if isinstance(fut.exception(), KeyboardInterrupt):
            # Ctrl-C reached a work item the waiting thread took over: the job stays pending, so
            # the shutdown that follows says what became of it
            raise KeyboardInterrupt
        return self.check()  # (collects it: a failure is raised once)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
