"""Requests that arrive together are scored together: a bounded asyncio queue feeds one worker task that
gathers up to max_batch images (waiting at most max_wait for more) and scores them on an executor thread,
so the event loop never blocks on the model and a search's per-call cost is shared by the batch.

Requests already received but still being read or decoded (`arriving`) are waited for too, up to
ARRIVING_WAIT_S: when a batch's answers go out, its clients send their next images together, but they are
decoded one after another; without this wait the first decoded one was scored alone and the rest as a
second batch (8 clients on Patch SVDD: batches of 1 and 7 in turn). An idle server waits for nothing.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

ARRIVING_WAIT_S = 0.25     # the longest a batch waits for requests still being read or decoded
POLL_S = 0.005             # how often a waiting batch looks again at what is arriving


class QueueFull(Exception):
    """More requests are waiting than --max_queue allows."""


@dataclass
class _Job:
    images: np.ndarray
    future: asyncio.Future


class BatchQueue:
    """One model's queue and scoring worker; `score` maps (n,...) images to a list of n results."""

    def __init__(self, score: Callable[[np.ndarray], list], executor: Executor, max_batch: int, max_wait_s: float,
                 max_queue: int):
        self.score, self.executor = score, executor
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=max_queue)
        self._held: _Job | None = None      # a job that did not fit the last batch: first in the next
        self._arriving = 0                  # requests being read or decoded, not yet queued
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def waiting(self) -> int:
        return self.queue.qsize()

    @contextlib.contextmanager
    def arriving(self):
        """Around reading and decoding a request's images, up to `put`: a batch being gathered waits for them."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    def put(self, images: np.ndarray) -> asyncio.Future:
        """Queues the images; the future gets their results, scored with whatever else arrives meanwhile.
        QueueFull when --max_queue requests are waiting."""
        job = _Job(images, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull from None
        return job.future

    async def _gather(self) -> list[_Job]:
        loop = asyncio.get_running_loop()
        first, self._held = self._held or await self.queue.get(), None
        jobs, n = [first], len(first.images)
        start = loop.time()
        while n < self.max_batch:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                now = loop.time()
                if self._arriving and now < start + ARRIVING_WAIT_S:
                    remaining = min(POLL_S, start + ARRIVING_WAIT_S - now)
                else:
                    remaining = start + self.max_wait_s - now
                    if remaining <= 0:
                        break
                try:
                    job = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    continue
            if n + len(job.images) > self.max_batch:
                self._held = job
                break
            jobs.append(job)
            n += len(job.images)
        return [j for j in jobs if not j.future.done()]     # a client that went away is not scored

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._gather()
            if not jobs:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.score,
                                                     np.concatenate([j.images for j in jobs]))
            except Exception as e:
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            start = 0
            for j in jobs:
                if not j.future.done():
                    j.future.set_result(results[start:start + len(j.images)])
                start += len(j.images)
