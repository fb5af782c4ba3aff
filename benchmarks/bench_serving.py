"""Serving speed: `lamina serve` against llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) on the same
GGUF, same machine, same run, with the same concurrent streaming clients.

    python benchmarks/bench_serving.py [--model FILE.gguf] [--requests 64] [--concurrency 16] [--max-tokens 64]

Each server runs in its own process on loopback; `--concurrency` clients send `--requests` streaming completion
requests in all (prompts of mixed lengths, greedy, `max_tokens` each). Measured per server: requests/s and output
tokens/s over the whole run, time to first token and inter-token latency (p50, p99). Ratios are lamina's over
llama.cpp's (for latencies and memory: llama.cpp's over lamina's, so > 1 is better for lamina either way). Peak RSS is
the server process's high-water mark (VmHWM) at the end of the run. Beside the table, a chart
(benchmarks/charts/serving.png): throughput, and time-to-first-token and inter-token latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import charts  # noqa: E402
from bench_generate import machine_line  # noqa: E402

TEXTS = [
    "The history of the Roman Empire",
    "Write a short story about a robot who learns to paint. Once upon a time,",
    "List the planets of the solar system and describe each one in a sentence:",
    "def quicksort(items):",
    "Explain, step by step, how a bill becomes a law in the United States. First,",
    "The recipe for a good bread starts with",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(engine: str, model: str, port: int, args) -> subprocess.Popen:
    if engine == "lamina":
        cmd = [sys.executable, "-m", "lamina", "serve", "--model", model, "--port", str(port)]
        cmd += [
            "--max-batch-size",
            str(args.concurrency),
            "--max-queue",
            str(args.requests),
            "--threads",
            str(args.threads),
        ]
        cmd += ["--max-seq-len", "1024"]
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
        # It runs one request at a time; by default a new request interrupts the one streaming: queue them instead.
        cmd += ["--n_ctx", "1024", "--interrupt_requests", "False"]
        cmd += ["--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)]
    return launch(engine, cmd, port)


def launch(engine: str, cmd: list[str], port: int) -> subprocess.Popen:
    """Start a server command and wait until it answers /v1/models on `port` (its stderr kept for the error)."""
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would stall the server's logging
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    for _ in range(600):
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"{engine} server exited: {log.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{engine} server did not come up")


def ratio_table(results: dict, rows: list) -> None:
    """A Markdown table of `rows` (label, value(result), lower_is_better) for each engine, then lamina's ratio to
    each other engine, oriented so that > 1 is better for lamina."""
    peers = [e for e in results if e != "lamina"]
    header = ["metric", *results, *(f"lamina / {p}" for p in peers)]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for label, value, lower_is_better in rows:
        row = [label, *(f"{value(r):.1f}" for r in results.values())]
        for p in peers:
            if "lamina" in results:
                ours, theirs = value(results["lamina"]), value(results[p])
                row.append(f"{(theirs / ours if lower_is_better else ours / theirs):.2f}x")
        print("| " + " | ".join(row) + " |")


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    times = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice.get("finish_reason") is None or choice.get("text"):
                times.append(time.perf_counter())
    return {"start": start, "times": times}


async def workload(url: str, model: str, args) -> dict:
    sem = asyncio.Semaphore(args.concurrency)

    async def limited(i):
        async with sem:
            prompt = TEXTS[i % len(TEXTS)] + " " + " ".join(TEXTS[: i % 3])
            return await one(client, url, model, prompt, args.max_tokens)

    async with httpx.AsyncClient(timeout=600) as client:
        await one(client, url, model, "Hello", 4)  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*(limited(i) for i in range(args.requests)))
        wall = time.perf_counter() - start
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(len(r["times"]) for r in results)
    return {"wall": wall, "rps": args.requests / wall, "tps": tokens / wall, "tokens": tokens, "ttft": ttft, "itl": itl}


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb / 1024


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a llama GGUF file (default: the embedded SmolLM2)")
    parser.add_argument("--engines", default="lamina,llama.cpp")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    charts.add_option(parser, __file__)
    args = parser.parse_args()
    if args.model is None:
        from lamina.loader import default_model_path

        args.model = str(default_model_path())
    name = os.path.basename(args.model)

    results = {}
    for engine in args.engines.split(","):
        print(f"running {engine} ...", file=sys.stderr, flush=True)
        port = free_port()
        proc = start(engine, args.model, port, args)
        try:
            served = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
            results[engine] = asyncio.run(workload(f"http://127.0.0.1:{port}", served, args))
            results[engine]["rss"] = peak_rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    machine = machine_line(args.threads)
    workload_line = (
        f"{args.requests} streaming completions, {args.concurrency} concurrent clients, up to {args.max_tokens} "
        "tokens each, greedy"
    )
    print(f"# {machine}, model {name}, {workload_line}")
    rows = [
        ("requests/s", lambda r: r["rps"], False),
        ("output tokens/s", lambda r: r["tps"], False),
        *((f"time to first token p{q} (ms)", lambda r, q=q: 1000 * pct(r["ttft"], q), True) for q in PERCENTILES),
        *((f"inter-token latency p{q} (ms)", lambda r, q=q: 1000 * pct(r["itl"], q), True) for q in PERCENTILES),
        ("server peak RSS (MB)", lambda r: r["rss"], True),
    ]
    ratio_table(results, rows)
    if args.chart != "none" and results:
        chart(results, f"{name}, {workload_line}\n{machine}", args.chart)
    return 0


PERCENTILES = (50, 90, 99)


def chart(results: dict, title: str, path: str) -> None:
    """Requests/s, output tokens/s, then time to first token and inter-token latency at each percentile, one bar
    per server."""
    fig, (requests, tokens, ttft, itl) = charts.figure(4, title, width=3.8)
    if fig is None:
        return
    engines = list(results)
    charts.bars(requests, [""], {e: [results[e]["rps"]] for e in engines}, "requests/s", "requests/s")
    charts.bars(tokens, [""], {e: [results[e]["tps"]] for e in engines}, "tokens/s", "output tokens/s")
    groups = [f"p{q}" for q in PERCENTILES]
    charts.bars(
        ttft,
        groups,
        {e: [1000 * pct(results[e]["ttft"], q) for q in PERCENTILES] for e in engines},
        "ms (log scale)",
        "time to first token",
        log_y=True,
    )
    charts.bars(
        itl,
        groups,
        {e: [1000 * pct(results[e]["itl"], q) for q in PERCENTILES] for e in engines},
        "ms",
        "inter-token latency",
    )
    charts.save(fig, path)


if __name__ == "__main__":
    sys.exit(main())
