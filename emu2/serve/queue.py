"""One model, one worker thread, a bounded line of waiting requests.

The model runs on its own thread so the event loop keeps answering (health checks, 429s, streams) while it
computes; one thread because a model is not safe to call concurrently and one call already uses every core
(or the whole GPU). Requests beyond ``max_pending`` waiting get 429 at once rather than waiting forever, and
each request has a deadline: past it the client gets 504 and the job's ``cancel`` event is set, which text
generation checks after every token (`CancelOnEvent`), so a timed-out answer stops costing compute.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria

from .schemas import APIError

logger = logging.getLogger("emu2.serve")


class CancelOnEvent(StoppingCriteria):
    """Stops ``generate`` at the next token once ``event`` is set (timeout, or a streaming client left)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


DISCONNECT_POLL_S = 0.1  # how often a waiting non-streamed request checks that its client is still there


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready (its job was cancelled)."""


@dataclass
class Job:
    """``fn(cancel)`` to run on the worker thread; its result or exception lands in ``future``."""

    fn: Callable[[threading.Event], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    deadline: float
    cancel: threading.Event = field(default_factory=threading.Event)

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


class ModelWorker:
    """Runs jobs one at a time on a daemon thread; ``submit`` refuses with 429 when ``max_pending`` wait."""

    def __init__(self, max_pending: int, timeout: float):
        self.timeout = timeout
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max(1, max_pending))
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.busy = False

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def submit(self, fn: Callable[[threading.Event], Any]) -> Job:
        """Queue ``fn``; raises `APIError` 429 at once when the line is full."""
        self._ensure_started()
        loop = asyncio.get_running_loop()
        job = Job(fn, loop.create_future(), loop, time.monotonic() + self.timeout)
        # Retrieve the outcome even when nobody awaits it any more (timed out), so asyncio logs no warning.
        job.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise APIError(429, f"the server is busy: {self._queue.maxsize} requests are already waiting for the "
                                "model; retry shortly (server limit --max-queue)", None, "queue_full") from None
        return job

    async def run(self, fn: Callable[[threading.Event], Any],
                  disconnected: Callable[[], Awaitable[bool]] | None = None) -> Any:
        """Submit ``fn`` and wait for its result until the request's deadline (504 after it).

        ``disconnected`` (e.g. Starlette's ``request.is_disconnected``) is asked every `DISCONNECT_POLL_S` while
        the job waits or runs: once the client has gone, the job is cancelled (the worker skips it, or ``fn`` sees
        its cancel event) and the call raises `ClientDisconnected`. A response nobody reads is not computed.
        """
        job = self.submit(fn)
        try:
            if disconnected is None:
                return await asyncio.wait_for(asyncio.shield(job.future), job.remaining())
            while True:
                done, _ = await asyncio.wait({job.future}, timeout=min(DISCONNECT_POLL_S, job.remaining()))
                if done:
                    return job.future.result()
                if job.remaining() <= 0:
                    raise TimeoutError
                if await disconnected():
                    job.cancel.set()
                    raise ClientDisconnected()
        except TimeoutError:
            job.cancel.set()
            raise APIError(504, f"the request did not finish within {self.timeout:g} s (server limit --timeout)",
                           None, "timeout") from None
        finally:
            if not job.future.done():  # client gone or timed out: the worker skips or stops the job
                job.cancel.set()

    def close(self) -> None:
        """Stop the thread after its current job; jobs still waiting are dropped (their clients are gone)."""
        self._closed.set()
        try:
            self._queue.put_nowait(None)  # wakes an idle worker; a busy one sees _closed after its job
        except queue.Full:
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # ------------------------------------------------------------------------------------------- thread
    def _ensure_started(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="emu2-model", daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while not self._closed.is_set():
            job = self._queue.get()
            if job is None:
                return
            if job.cancel.is_set() or job.remaining() <= 0:
                continue  # nobody is waiting for it any more
            self.busy = True
            try:
                self._run_job(job)
            finally:
                self.busy = False

    def _run_job(self, job: Job) -> None:
        """Run one job to its end on this thread and settle its future."""
        try:
            result, error = job.fn(job.cancel), None
        except BaseException as exc:
            result, error = None, exc
            if not isinstance(exc, APIError):
                logger.exception("model call failed")
        settle_job(job, result, error)


def settle_job(job: Job, result: Any, error: BaseException | None) -> None:
    """Hand a job's outcome to its event loop (from the model thread)."""
    try:
        job.loop.call_soon_threadsafe(_settle, job.future, result, error)
    except RuntimeError:  # the event loop has closed (server shutting down)
        pass


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
