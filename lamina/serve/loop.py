"""EngineLoop: the server's thread that steps the engine core, and the bridge between it and the event loop.

Coroutines submit requests and read their outputs from an asyncio queue; the engine thread adds them between steps
and steps the core while it has work, so the event loop never waits for a forward pass. The core is the model's one
core: offline calls on the same Llama may step it too; each request's outputs reach its own sink either way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from typing import AsyncIterator, Callable, Sequence

import torch

from lamina.engine import Request, RequestOutput
from lamina.engine.output import OutputProcessor
from lamina.engine.scheduler import PrefillPacer
from lamina.errors import ShuttingDown
from lamina.llama import Llama
from lamina.serve.metrics import Metrics


class EngineLoop:
    """Steps `llama.core` on a thread of its own. At most `max_queue` requests wait beyond the running batch."""

    def __init__(self, llama: Llama, max_queue: int):
        self.llama, self.engine, self.max_queue = llama, llama.core, max_queue
        # stall-free steps: a long prompt is spread over steps instead of pausing every stream for its whole chunk
        self.engine.scheduler.pacer = PrefillPacer()
        self.metrics = Metrics()
        self._mine: dict = {}  # request id -> Request, this server's requests still running (to abort at shutdown)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self.draining = False  # set by drain(): new requests are refused (ShuttingDown), running ones go on
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._run, name="lamina-engine", daemon=True)
        # Called after a failed step's requests have been failed: where a failure cannot be recovered from (a rank of
        # a tensor-parallel group gone), the server sets it to stop itself.
        self.on_step_error: Callable[[Exception], None] | None = None
        # Called on the engine thread about every 0.1 s while there is no work (a tensor-parallel server's heartbeat
        # to its other ranks); what it raises goes to on_step_error.
        self.on_idle: Callable[[], None] | None = None

    def start(self) -> None:
        self._thread.start()

    def drain(self) -> None:
        """Take no new requests (submit raises ShuttingDown); those running and queued go on to their ends."""
        self.draining = True

    @property
    def in_flight(self) -> int:
        """This server's requests not yet finished (running or queued)."""
        return len(self._mine)

    @property
    def overloaded(self) -> bool:
        """The queue is full: a request now would be refused (429) unless one finishes first."""
        scheduler = self.engine.scheduler
        free = max(0, scheduler.config.max_running - len(scheduler.running))
        return len(scheduler.waiting) >= self.max_queue + free

    def stop(self) -> None:
        """Abort what is in flight (its streams end with finish_reason "abort") and stop the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        with self.engine.lock:
            for request in list(self._mine.values()):
                self.engine.abort(request.request_id)
                request.sink(OutputProcessor.failed(request, None))

    async def submit(self, requests: Sequence[Request]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Queue the requests (all or none; raises the core's RequestError / CapacityError). Returns an async
        iterator of (index in `requests`, output) as outputs come, to the last one's finish; it raises a failed
        step's error, and aborts the requests still running when it is closed (the client went away)."""
        if self.draining:
            raise ShuttingDown("the server is shutting down: it finishes the requests it has and takes no new ones")
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def add():
            with self.engine.lock:
                added = []
                try:
                    for i, request in enumerate(requests):
                        request.sink = self._sink(loop, outputs, i, self.metrics.timer())
                        self.engine.add(request, max_waiting=self.max_queue)
                        added.append(request)
                except BaseException:
                    for request in added:
                        self.engine.abort(request.request_id)
                    raise
                for request in added:
                    self._mine[request.request_id] = request
                    self.metrics.accepted(len(request.prompt))

        await asyncio.wrap_future(self._call(add))
        return self._outputs(requests, outputs)

    def _sink(self, loop, outputs: asyncio.Queue, index: int, observe) -> Callable[[RequestOutput], None]:
        def deliver(out: RequestOutput) -> None:  # on whichever thread stepped the core, under its lock
            observe(out)
            if out.finish_reason is not None:
                self._mine.pop(out.request_id, None)
            loop.call_soon_threadsafe(outputs.put_nowait, (index, out))

        return deliver

    async def _outputs(self, requests: Sequence[Request], outputs: asyncio.Queue):
        running = set(range(len(requests)))
        try:
            while running:
                index, out = await outputs.get()
                if out.error is not None:
                    raise out.error
                if out.finish_reason is not None:
                    running.discard(index)
                yield index, out
        finally:
            for index in running:
                self.abort(requests[index].request_id)

    def abort(self, request_id) -> None:
        def drop():
            with self.engine.lock:
                if self._mine.pop(request_id, None) is not None:  # still running: its client went away
                    self.metrics.aborted()
                self.engine.abort(request_id)

        self._call(drop)

    def _call(self, fn: Callable) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._stopping:
            future.set_exception(ShuttingDown("the server is shutting down"))
            return future
        self._commands.put((fn, future))
        self._wake.set()
        return future

    def _run(self) -> None:
        torch.set_num_threads(self._threads)  # OpenMP's thread count is per thread: the server's, not the default
        while not self._stopping:
            while not self._commands.empty():
                fn, future = self._commands.get()
                try:
                    future.set_result(fn())
                except BaseException as e:  # noqa: BLE001 (handed to the awaiting coroutine)
                    future.set_exception(e)
            with self.engine.lock:
                busy = self.engine.has_work
                if busy:
                    try:
                        self.engine.step()
                    except Exception as e:  # noqa: BLE001 (a bug must not take the server down: fail what ran)
                        self.engine.fail(e)
                        if self.on_step_error is not None:
                            self.on_step_error(e)
            if not busy:
                if self.on_idle is not None:
                    try:
                        self.on_idle()
                    except Exception as e:  # noqa: BLE001 (reported like a failed step)
                        if self.on_step_error is not None:
                            self.on_step_error(e)
                self._wake.wait(0.1)
                self._wake.clear()
