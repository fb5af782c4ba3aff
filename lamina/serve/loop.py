"""EngineLoop: an Engine on a thread of its own, driven by commands from the event loop, and the server's metrics.

The engine thread owns the Engine: it takes commands (add a request, abort one) between steps and hands every step's
outputs to the asyncio queues of the requests' handlers, so the event loop never waits for a forward pass.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections import deque
from typing import Callable

import torch

from lamina.engine.engine import Engine, RequestOutput
from lamina.engine.sampling import SamplingParams
from lamina.errors import CapacityError

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Histogram:
    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self.counts = [0] * len(_BUCKETS)
        self.total, self.n = 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(_BUCKETS):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def text(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        lines += [f'{self.name}_bucket{{le="{b}"}} {c}' for b, c in zip(_BUCKETS, self.counts)]
        lines += [
            f'{self.name}_bucket{{le="+Inf"}} {self.n}',
            f"{self.name}_sum {self.total}",
            f"{self.name}_count {self.n}",
        ]
        return "\n".join(lines)


class EngineLoop:
    """Runs an Engine on its own thread. Coroutines `submit` requests and read their outputs from a queue."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict = {}  # request id -> (event loop, asyncio.Queue, submitted at, last token at)
        self._wake = threading.Event()
        self._stopping = False
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._run, name="lamina-engine", daemon=True)
        # metrics
        self.requests_total = 0
        self.finished: dict[str, int] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last steps, for tokens/s
        self.ttft = _Histogram(
            "lamina_time_to_first_token_seconds", "Time from a request's arrival to its first token."
        )
        self.itl = _Histogram("lamina_inter_token_latency_seconds", "Time between two tokens of one request.")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Abort what is in flight (its streams end with finish_reason "abort") and stop the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)

    async def submit(self, prompt: list[int], params: SamplingParams, ignore_eos: bool):
        """Queue a request; returns (request id, asyncio.Queue of its RequestOutputs). Raises the engine's
        RequestError / CapacityError."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def add():
            request_id = self.engine.add(prompt, params, ignore_eos=ignore_eos)
            self._streams[request_id] = (loop, outputs, time.perf_counter(), None)
            self.requests_total += 1
            self.prompt_tokens_total += len(prompt)
            return request_id

        request_id = await asyncio.wrap_future(self._call(add))
        return request_id, outputs

    def abort(self, request_id) -> None:
        def drop():
            self._streams.pop(request_id, None)
            self.engine.abort(request_id)

        self._call(drop)

    def call(self, fn: Callable):
        """Run fn on the engine thread, between steps (for work that uses the model, such as scoring a prompt)."""
        return asyncio.wrap_future(self._call(fn))

    def _call(self, fn: Callable) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._stopping:
            future.set_exception(CapacityError("the server is shutting down"))
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
            if not self.engine.has_work:
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 (a bug must not take the server down: fail what was running)
                self._fail_all(e)
                continue
            self._deliver(outputs)
        self._fail_all(None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.perf_counter()
        tokens = 0
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if out.token is not None:
                tokens += 1
            if stream is None:
                continue
            loop, q, submitted, last = stream
            if out.token is not None:
                (self.ttft if last is None else self.itl).observe(now - (submitted if last is None else last))
                self._streams[out.request_id] = (loop, q, submitted, now)
            if out.finish_reason is not None:
                self.finished[out.finish_reason] = self.finished.get(out.finish_reason, 0) + 1
                del self._streams[out.request_id]
            loop.call_soon_threadsafe(q.put_nowait, out)
        self.generation_tokens_total += tokens
        self._recent.append((now, tokens))
        while self._recent and now - self._recent[0][0] > 10:
            self._recent.popleft()

    def _fail_all(self, error: Exception | None) -> None:
        """End every stream: with the error (a failed step), or as aborted (shutdown)."""
        for request_id, (loop, q, _, _) in list(self._streams.items()):
            self.engine.abort(request_id)
            item = error if error is not None else RequestOutput(request_id, None, "", None, None, "abort", 0, 0)
            loop.call_soon_threadsafe(q.put_nowait, item)
        self._streams.clear()

    def metrics(self) -> str:
        s, pool = self.engine.scheduler, self.engine.pool
        window = sum(t for _, t in self._recent)
        span = (self._recent[-1][0] - self._recent[0][0]) if len(self._recent) > 1 else 0.0
        gauges = [
            ("lamina_requests_running", "Requests in the running batch.", len(s.running)),
            ("lamina_requests_waiting", "Requests waiting in the queue.", len(s.waiting)),
            ("lamina_kv_blocks_used", "KV-cache blocks in use.", pool.num_used),
            ("lamina_kv_blocks_total", "KV-cache blocks in all.", pool.num_blocks),
            (
                "lamina_generation_tokens_per_second",
                "Tokens generated per second, last 10 s.",
                window / span if span else 0,
            ),
        ]
        lines = []
        for name, help, value in gauges:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {value}"]
        for name, help, value in [
            ("lamina_requests_total", "Requests accepted.", self.requests_total),
            ("lamina_prompt_tokens_total", "Prompt tokens of accepted requests.", self.prompt_tokens_total),
            ("lamina_generation_tokens_total", "Tokens generated.", self.generation_tokens_total),
        ]:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name} {value}"]
        lines += [
            "# HELP lamina_requests_finished_total Requests finished, by reason.",
            "# TYPE lamina_requests_finished_total counter",
        ]
        lines += [f'lamina_requests_finished_total{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
        return "\n".join(lines + [self.ttft.text(), self.itl.text()]) + "\n"
