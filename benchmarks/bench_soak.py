"""Soak: a server under ~20 minutes of mixed traffic, watched for what it leaves behind. `lamina serve` against
llama.cpp's server (llama-server) on the same GGUF, one after the other, the same traffic for each.

    python benchmarks/bench_soak.py [--model FILE.gguf] [--minutes 20] [--rate 0.5] [--engines lamina,llama-server]

Requests arrive at random (Poisson, `--rate` a second) and are of every kind a server meets: streamed chat turns,
structured output (a JSON schema, the reply checked against it), lm-eval's scoring requests (the prompt echoed with its
logprobs), long documents, clients that abort a stream after a few tokens, clients that give up waiting for an answer
(while it is queued or its prompt is being read), and every `--burst-every` seconds a burst of `--burst` requests at
once, more than the batch and the queue hold (lamina refuses the excess with 429 and Retry-After; llama-server has no
bound: it queues them all). Every `--sample` seconds: the server's resident memory (VmRSS) and, from /metrics, the
KV-cache blocks in use and the requests running and waiting.

Reported per server: requests answered, refused (429/503 with Retry-After), left by their clients on purpose, and
errors (any other answer: 5xx, another 4xx, a reset connection, a structured reply that breaks its schema); RSS after
warm-up (the first `--warmup` of the run: the KV cache's pages become resident as its blocks are first written) and at
the end, its growth and its slope after warm-up; lamina's KV blocks in use once the traffic has ended (all must be
free). A chart (benchmarks/charts/soak.png): RSS over time for each server, lamina's KV blocks in use and the
requests in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
from pathlib import Path

import httpx
import jsonschema

sys.path.insert(0, str(Path(__file__).parent))
import charts  # noqa: E402
from bench_generate import machine_line  # noqa: E402
from bench_serving import NO_KEEPALIVE, WORDS, build_llama_server, free_port, ratio_table, start  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}

# (kind, share of the arrivals)
MIX = (
    ("chat", 0.30),  # a streamed chat turn, 32-96 new tokens
    ("structured", 0.15),  # a chat reply constrained to SCHEMA, in one piece
    ("scoring", 0.15),  # echo + logprobs, one new token, in one piece (llama-server: no echo, the same prefill)
    ("document", 0.10),  # a 700-1300-word prompt, streamed
    ("abort", 0.15),  # a streamed completion the client closes after 1-10 tokens
    ("leave", 0.15),  # an answer in one piece to a long prompt, the client gone after 0.2-2 s
)


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


class Outcomes:
    """What became of the requests: answered, refused, left by their clients on purpose, errors (by cause)."""

    def __init__(self):
        self.counts = {"sent": 0, "answered": 0, "refused": 0, "left": 0, "errors": 0}
        self.causes: dict[str, int] = {}
        self.in_flight = 0

    def error(self, cause: str) -> None:
        self.counts["errors"] += 1
        self.causes[cause] = self.causes.get(cause, 0) + 1


async def request(
    client: httpx.AsyncClient, url: str, model: str, kind: str, rng: random.Random, engine: str, out: Outcomes
) -> None:
    """Send one request of `kind` and count what became of it."""
    out.counts["sent"] += 1
    out.in_flight += 1
    try:
        await _request(client, url, model, kind, rng, engine, out)
    except httpx.TimeoutException:
        if kind == "leave":
            out.counts["left"] += 1
        else:
            out.error("timeout")
    except httpx.HTTPError as e:
        out.error(type(e).__name__)
    except (ValueError, KeyError, IndexError) as e:  # an answer that is not what the API says
        out.error(f"malformed answer ({type(e).__name__})")
    finally:
        out.in_flight -= 1


def _refused(r: httpx.Response, out: Outcomes) -> bool:
    """True for a 429 or 503 (counted as refused when it says when to come back); any other non-200 is an error."""
    if r.status_code in (429, 503):
        if "retry-after" in r.headers:
            out.counts["refused"] += 1
        else:
            out.error(f"{r.status_code} without Retry-After")
        return True
    if r.status_code != 200:
        out.error(f"HTTP {r.status_code}")
        return True
    return False


async def _request(client, url, model, kind, rng, engine, out) -> None:
    if kind in ("chat", "document", "abort", "burst"):
        lo, hi, tokens = {
            "chat": (20, 150, rng.randint(32, 96)),
            "document": (700, 1300, 32),
            "abort": (20, 300, 200),
            "burst": (10, 40, 16),
        }[kind]
        if kind in ("chat", "burst"):
            body = {"messages": [{"role": "user", "content": words(rng, lo, hi)}], "max_tokens": tokens}
            path = "/v1/chat/completions"
        else:
            body, path = {"prompt": f"Summarize: {words(rng, lo, hi)}", "max_tokens": tokens}, "/v1/completions"
        body.update(model=model, stream=True, temperature=0.7, seed=rng.randrange(1 << 30))
        stop_after = rng.randint(1, 10) if kind == "abort" else None
        async with client.stream("POST", f"{url}{path}", json=body) as r:
            if _refused(r, out):
                return
            seen, done = 0, False
            async for line in r.aiter_lines():
                if line.startswith("data: [DONE]"):
                    done = True
                elif line.startswith("data: "):
                    if '"error"' in line[:12]:
                        out.error("error event")
                        return
                    seen += 1
                    if stop_after is not None and seen >= stop_after:
                        out.counts["left"] += 1
                        return  # leaving the block closes the connection mid-stream
        if done:
            out.counts["answered"] += 1
        else:
            out.error("stream ended without [DONE]")
        return
    if kind == "structured":
        body = {
            "model": model,
            "messages": [
                {
                    "role": "user",
                    "content": f"Invent a person who likes the {rng.choice(WORDS)}. Answer "
                    "in JSON with their name, age and city.",
                }
            ],
            "max_tokens": 96,
            "temperature": 0.7,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
        }
        r = await client.post(f"{url}/v1/chat/completions", json=body)
        if _refused(r, out):
            return
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "stop":
            try:
                jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
            except (ValueError, jsonschema.ValidationError):
                out.error("structured reply breaks its schema")
                return
        out.counts["answered"] += 1
        return
    if kind in ("scoring", "leave"):
        lo, hi = (100, 600) if kind == "scoring" else (600, 1300)
        body = {"model": model, "prompt": words(rng, lo, hi), "max_tokens": 1 if kind == "scoring" else 64}
        if kind == "scoring":
            body["logprobs"] = 1
            if engine != "llama-server":  # it cannot score a prompt ("Only no echo is supported")
                body["echo"] = True
        timeout = httpx.Timeout(rng.uniform(0.2, 2.0)) if kind == "leave" else None
        r = await client.post(f"{url}/v1/completions", json=body, **({"timeout": timeout} if timeout else {}))
        if _refused(r, out):
            return
        if not r.json()["choices"][0].get("text") and kind == "scoring" and engine != "llama-server":
            out.error("a scored prompt answered without its text")
            return
        out.counts["answered"] += 1
        return
    raise ValueError(kind)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


async def scrape(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    """The gauges of /metrics (lamina's KV blocks and requests; llama-server's requests processing and deferred)."""
    try:
        text = (await client.get(f"{url}/metrics", timeout=10)).text
    except httpx.HTTPError:
        return {}
    wanted = (
        "lamina_kv_blocks_used",
        "lamina_kv_blocks_total",
        "lamina_requests_running",
        "lamina_requests_waiting",
        "llamacpp:requests_processing",
        "llamacpp:requests_deferred",
    )
    found = {}
    for line in text.splitlines():
        m = re.match(r"^(\S+) (\S+)$", line)
        if m and m.group(1) in wanted:
            found[m.group(1).split(":")[-1].removeprefix("lamina_")] = float(m.group(2))
    return found


async def soak(url: str, model: str, pid: int, engine: str, args) -> dict:
    rng = random.Random(args.seed)
    out, samples, tasks = Outcomes(), [], set()
    kinds, weights = [k for k, _ in MIX], [w for _, w in MIX]
    limits = NO_KEEPALIVE
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        end = t0 + 60 * args.minutes

        def launch(kind: str) -> None:
            task = asyncio.create_task(request(client, url, model, kind, random.Random(rng.random()), engine, out))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def sampler() -> None:
            while True:
                gauges = await scrape(client, url)
                t = time.perf_counter() - t0
                samples.append({"t": t, "rss": rss_mb(pid), "in_flight": out.in_flight, **gauges})
                await asyncio.sleep(args.sample)

        watcher = asyncio.create_task(sampler())
        next_burst = t0 + args.burst_every
        at = t0
        while True:
            at += rng.expovariate(args.rate)
            while next_burst <= min(at, end):
                await asyncio.sleep(max(0.0, next_burst - time.perf_counter()))
                for _ in range(args.burst):
                    launch("burst")
                next_burst += args.burst_every
            if at >= end:
                break
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            launch(rng.choices(kinds, weights)[0])
        # The traffic has ended: what is in flight finishes (or, past --drain seconds, counts as an error).
        if tasks:
            _, late = await asyncio.wait(set(tasks), timeout=args.drain)
            for task in late:
                task.cancel()
                out.error("unfinished after the traffic ended")
        await asyncio.sleep(2 * args.sample)
        watcher.cancel()
        final = await scrape(client, url)
    return {"outcomes": out, "samples": samples, "final": final}


def slope_mb_per_hour(points: list[tuple[float, float]]) -> float:
    n = len(points)
    if n < 2:
        return 0.0
    mx, my = sum(t for t, _ in points) / n, sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    return 3600 * sum((t - mx) * (v - my) for t, v in points) / var if var else 0.0


def summary(result: dict, args) -> dict:
    samples = result["samples"]
    warm = [s for s in samples if s["t"] >= 60 * args.warmup]
    after = warm or samples
    c = result["outcomes"].counts
    return {
        **c,
        "causes": result["outcomes"].causes,
        "rss_warm": after[0]["rss"],
        "rss_end": samples[-1]["rss"],
        "rss_peak": max(s["rss"] for s in samples),
        "growth": samples[-1]["rss"] - after[0]["rss"],
        "slope": slope_mb_per_hour([(s["t"], s["rss"]) for s in after]),
        "blocks_end": result["final"].get("kv_blocks_used"),
        "blocks_total": result["final"].get("kv_blocks_total"),
        "waiting_end": result["final"].get("requests_waiting", result["final"].get("requests_deferred")),
        "samples": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a llama GGUF file (default: the embedded SmolLM2)")
    parser.add_argument("--engines", default="lamina,llama-server", help="lamina, llama-server")
    parser.add_argument("--minutes", type=float, default=20.0, help="traffic per server")
    parser.add_argument("--rate", type=float, default=0.5, help="arrivals a second (bursts aside)")
    parser.add_argument("--burst", type=int, default=48, help="requests sent at once in a burst")
    parser.add_argument("--burst-every", type=float, default=120.0, help="seconds between bursts")
    parser.add_argument("--concurrency", type=int, default=16, help="each server's batch (lamina's queue: the same)")
    parser.add_argument("--context", type=int, default=2048, help="tokens a sequence")
    parser.add_argument("--warmup", type=float, default=4.0, help="minutes before RSS is held to be flat")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--drain", type=float, default=300.0, help="seconds the last requests may take")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    charts.add_option(parser, __file__)
    args = parser.parse_args()
    args.max_queue = args.concurrency
    if args.model is None:
        from lamina.loader import default_model_path

        args.model = str(default_model_path())
    if "llama-server" in args.engines:
        build_llama_server()
    results = {}
    for engine in args.engines.split(","):
        print(f"soaking {engine} for {args.minutes:g} minutes ...", file=sys.stderr, flush=True)
        port = free_port()
        proc = start(engine, args.model, port, args)
        try:
            url = f"http://127.0.0.1:{port}"
            served = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            results[engine] = summary(asyncio.run(soak(url, served, proc.pid, engine, args)), args)
            if proc.poll() is not None:
                raise SystemExit(f"{engine}'s server died during the soak (exit status {proc.returncode})")
        finally:
            proc.terminate()
            proc.wait(timeout=120)
        print(
            f"{engine}: {json.dumps({k: v for k, v in results[engine].items() if k != 'samples'})}",
            file=sys.stderr,
            flush=True,
        )

    machine = machine_line(args.threads)
    name = os.path.basename(args.model)
    shares = ", ".join(f"{int(100 * w)}% {k}" for k, w in MIX)
    line = (
        f"{args.minutes:g} minutes a server, {args.rate:g} arrivals/s ({shares}) and a burst of {args.burst} every "
        f"{args.burst_every:g} s; batch {args.concurrency}, lamina's queue {args.max_queue}"
    )
    print(f"# {machine}, model {name}, {line}")
    rows = [
        ("requests sent", lambda r: r["sent"], False),
        ("answered", lambda r: r["answered"], False),
        ("refused (429/503 + Retry-After)", lambda r: r["refused"], True),
        ("left by their clients (on purpose)", lambda r: r["left"], False),
        ("errors", lambda r: r["errors"], True),
        (f"RSS after warm-up ({args.warmup:g} min, MB)", lambda r: r["rss_warm"], True),
        ("RSS at the end (MB)", lambda r: r["rss_end"], True),
        ("RSS growth after warm-up (MB)", lambda r: r["growth"], True),
        ("RSS slope after warm-up (MB/hour)", lambda r: r["slope"], True),
        ("peak RSS (MB)", lambda r: r["rss_peak"], True),
    ]
    ratio_table(results, rows)
    for engine, r in results.items():
        if r["causes"]:
            print(f"\n{engine}'s errors: " + ", ".join(f"{n} {cause}" for cause, n in r["causes"].items()))
        if r["blocks_end"] is not None:
            print(
                f"\n{engine}: KV blocks in use once the traffic ended: {r['blocks_end']:.0f} of "
                f"{r['blocks_total']:.0f}; requests still waiting: {r['waiting_end']:.0f}"
            )
    if args.chart != "none" and results:
        chart(results, f"{name}, {line}\n{machine}", args.chart)
    return 0


def chart(results: dict, title: str, path: str) -> None:
    """RSS over time for each server; lamina's KV blocks in use and each server's requests in flight."""
    fig, (rss, pool) = charts.figure(2, title, width=7.0)
    if fig is None:
        return
    for color, (engine, r) in zip(charts.colors(results), results.items()):
        ts = [s["t"] / 60 for s in r["samples"]]
        rss.plot(ts, [s["rss"] for s in r["samples"]], label=engine, color=color, linewidth=1.5)
        pool.plot(
            ts,
            [s["in_flight"] for s in r["samples"]],
            label=f"{engine}: requests in flight",
            color=color,
            linewidth=1,
            alpha=0.6,
        )
        if any("kv_blocks_used" in s for s in r["samples"]):
            pool.plot(
                ts,
                [s.get("kv_blocks_used", 0) for s in r["samples"]],
                label=f"{engine}: KV blocks in use",
                color=color,
                linewidth=1.5,
                linestyle="--",
            )
    rss.set(xlabel="minutes", ylabel="MB", title="server resident memory (VmRSS)")
    rss.set_ylim(bottom=0)
    rss.legend(fontsize=8)
    pool.set(xlabel="minutes", ylabel="count", title="requests in flight (client side); KV blocks in use")
    pool.legend(fontsize=8)
    charts.save(fig, path)


if __name__ == "__main__":
    sys.exit(main())
