"""Requests that arrive together are scored together: a bounded asyncio queue feeds one worker task that
gathers up to max_batch images (waiting at most max_wait for more) and scores them on an executor thread,
so the event loop never blocks on the model and a search's per-call cost is shared by the batch."""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np


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
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def waiting(self) -> int:
        return self.queue.qsize()

    async def submit(self, images: np.ndarray) -> list:
        """The results for these images, scored with whatever else arrives meanwhile; QueueFull when full."""
        job = _Job(images, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull from None
        return await job.future

    async def _gather(self) -> list[_Job]:
        loop = asyncio.get_running_loop()
        first, self._held = self._held or await self.queue.get(), None
        jobs, n = [first], len(first.images)
        deadline = loop.time() + self.max_wait_s
        while n < self.max_batch:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
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
