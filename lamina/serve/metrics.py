"""The server's metrics, as Prometheus text: requests, tokens, time to first token and inter-token latency."""

from __future__ import annotations

import time
from collections import deque

from lamina.engine import EngineCore, RequestOutput

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
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


class Metrics:
    """Counters and histograms, updated as requests arrive and as their outputs come (`timer` per request)."""

    def __init__(self):
        self.requests_total = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.finished: dict[str, int] = {}
        self._recent: deque[float] = deque()  # times of the tokens of the last 10 s, for tokens/s
        self.ttft = Histogram("lamina_time_to_first_token_seconds", "Time from a request's arrival to its first token.")
        self.itl = Histogram("lamina_inter_token_latency_seconds", "Time between two tokens of one request.")

    def accepted(self, prompt_tokens: int) -> None:
        self.requests_total += 1
        self.prompt_tokens_total += prompt_tokens

    def aborted(self) -> None:
        """A running request was aborted (its client went away): counted as finished with reason "abort"."""
        self.finished["abort"] = self.finished.get("abort", 0) + 1

    def timer(self):
        """A function to call with each output of a request arriving now: times its tokens, counts its finish."""
        last = [time.perf_counter(), None]  # arrival, last token

        def observe(out: RequestOutput) -> None:
            now = time.perf_counter()
            if out.token is not None:
                (self.ttft if last[1] is None else self.itl).observe(now - (last[1] or last[0]))
                last[1] = now
                self.generation_tokens_total += 1
                self._recent.append(now)
                while self._recent and now - self._recent[0] > 10:
                    self._recent.popleft()
            if out.finish_reason is not None:
                self.finished[out.finish_reason] = self.finished.get(out.finish_reason, 0) + 1

        return observe

    def text(self, core: EngineCore) -> str:
        s, pool = core.scheduler, core.pool
        span = (self._recent[-1] - self._recent[0]) if len(self._recent) > 1 else 0.0
        gauges = [
            ("lamina_requests_running", "Requests in the running batch.", len(s.running)),
            ("lamina_requests_waiting", "Requests waiting in the queue.", len(s.waiting)),
            ("lamina_kv_blocks_used", "KV-cache blocks in use.", pool.num_used),
            ("lamina_kv_blocks_total", "KV-cache blocks in all.", pool.num_blocks),
            ("lamina_kv_blocks_cached", "KV-cache blocks holding a cached prefix (in use or free).", pool.num_cached),
            (
                "vllm:kv_cache_usage_perc",
                "KV-cache usage: the fraction of blocks in use (1 = full).",
                pool.num_used / pool.num_blocks,
            ),
            (
                "lamina_generation_tokens_per_second",
                "Tokens generated per second, last 10 s.",
                len(self._recent) / span if span else 0,
            ),
        ]
        lines = []
        for name, help, value in gauges:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {value}"]
        for name, help, value in [
            ("lamina_requests_total", "Requests accepted.", self.requests_total),
            ("lamina_prompt_tokens_total", "Prompt tokens of accepted requests.", self.prompt_tokens_total),
            ("lamina_generation_tokens_total", "Tokens generated.", self.generation_tokens_total),
            ("vllm:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.", pool.queries),
            ("vllm:prefix_cache_hits_total", "Prompt tokens found in the prefix cache.", pool.hits),
        ]:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name} {value}"]
        spec = core.speculator
        if spec is not None:  # vLLM's spec-decode counters
            st = spec.stats
            for name, help, value in [
                ("vllm:spec_decode_num_drafts_total", "Drafts verified (speculative decoding).", st.drafts),
                ("vllm:spec_decode_num_draft_tokens_total", "Draft tokens verified.", st.draft_tokens),
                ("vllm:spec_decode_num_accepted_tokens_total", "Draft tokens accepted.", st.accepted_tokens),
            ]:
                lines += [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name} {value}"]
            name = "vllm:spec_decode_num_accepted_tokens_per_pos_total"
            lines += [f"# HELP {name} Draft tokens accepted, by position in the draft.", f"# TYPE {name} counter"]
            lines += [f'{name}{{position="{i}"}} {n}' for i, n in enumerate(st.accepted_per_position)]
        lines += [
            "# HELP lamina_requests_finished_total Requests finished, by reason.",
            "# TYPE lamina_requests_finished_total counter",
        ]
        lines += [f'lamina_requests_finished_total{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
        return "\n".join(lines + [self.ttft.text(), self.itl.text()]) + "\n"
