"""Serving speed and latency: `lamina serve` against llama.cpp's own server (`llama-server`, C++, continuous batching
over `--parallel` slots; built here from the llama.cpp that llama-cpp-python vendors, ~5-10 minutes once) on the same
GGUF, same machine, same run. Each server runs in its own process on loopback, one after the other, with the same
batch (`--concurrency` sequences at once), threads and context a sequence.

    python benchmarks/bench_serving.py [--model FILE.gguf] [--requests 64] [--concurrency 16] [--max-tokens 64]
    python benchmarks/bench_serving.py --open [--load 0.7] [--requests 160] [--slo-ttft 3] [--slo-tpot 0.1]

Closed loop (the default): `--concurrency` clients send `--requests` streaming completions in all (short prompts,
greedy, `--max-tokens` each), each client its next when the last is answered. Measured per server: requests/s and
output tokens/s over the whole run, time to first token and inter-token latency (p50, p90, p99), peak RSS (the
server's VmHWM at the end). Chart: benchmarks/charts/serving.png.

Open loop (`--open`): requests arrive at random (Poisson) whether or not the server keeps up, a mix of chat turns
(20-200 words, 32-128 new tokens), long documents (700-1300 words, 16-64 new tokens) and lm-eval's scoring requests
(100-600 words echoed with their logprobs, one new token, answered in one piece), every prompt its own random words
(no prefix is shared). Each server's capacity is measured first (the mix with `--concurrency` clients always waiting);
then the mix runs at `--load` times the first engine's capacity (the same arrival rate, the same draw of requests and
arrival times for every server; `--rate` sets it instead). Measured: time to first token, inter-token latency (p50,
p90, p99, and p99 over p50), scoring requests' latency, goodput (requests/s answered within the SLO: first token, or a
scoring answer, within `--slo-ttft` s and a mean gap between tokens within `--slo-tpot` s), errors. llama-server cannot
return a prompt's logprobs (it refuses `echo`): its scoring requests are the same prompts for one token, the same
prefill without the scores. Chart: benchmarks/charts/serving_open.png.

Ratios are lamina's over the peer's (for latencies and memory the peer's over lamina's, so > 1 is better for lamina
either way). `--engines lamina,llama-cpp-python` runs llama-cpp-python's Python server instead (one request at a time;
the peer of the runs before 2026-12-06; it needs `pip install "llama-cpp-python[server]"`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
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
from bench_generate import LLAMA_CPP_BUILDS, LLAMA_CPP_VERSION, NO_AMX, machine_line  # noqa: E402

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


def build_llama_server() -> Path:
    """llama.cpp's own server (`llama-server`, C++: continuous batching over `--parallel` slots), built from the
    llama.cpp that llama-cpp-python LLAMA_CPP_VERSION vendors, for this machine, into benchmarks/.llama-cpp/ (~5-10
    minutes once, then reused). Without AMX: llama.cpp's AMX code stops with an illegal instruction on Sapphire Rapids
    (../shared/PERF-NOTES.md), and a server that dies mid-run measures nothing."""
    binary = LLAMA_CPP_BUILDS / f"server-{LLAMA_CPP_VERSION}" / "llama-server"
    if binary.is_file():
        return binary
    print(
        f"building llama-server (llama-cpp-python {LLAMA_CPP_VERSION}'s llama.cpp) into {binary.parent} ...",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp]
        subprocess.run([*pip, f"llama-cpp-python=={LLAMA_CPP_VERSION}"], check=True)
        (sdist,) = Path(tmp).glob("*.tar.gz")
        subprocess.run(["tar", "xzf", str(sdist), "-C", tmp], check=True)
        source = next(Path(tmp).glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        build = Path(tmp) / "build"
        configure = ["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON"]
        configure += ["-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF"]
        configure += [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
        subprocess.run(configure, check=True, stdout=subprocess.DEVNULL)
        jobs = str(len(os.sched_getaffinity(0)))
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], check=True)
        binary.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build / "bin" / "llama-server", binary)
    return binary


def start(engine: str, model: str, port: int, args) -> subprocess.Popen:
    """A server for `engine` on `port`, each with `args.threads` threads, `args.concurrency` sequences at once and
    room for `args.context` tokens a sequence."""
    threads, batch, context = str(args.threads), str(args.concurrency), str(args.context)
    if engine == "lamina":
        cmd = [sys.executable, "-m", "lamina", "serve", "--model", model, "--port", str(port), "--threads", threads]
        queue = str(getattr(args, "max_queue", 100_000))  # the benchmarks measure latency, not refusals
        cmd += ["--max-batch-size", batch, "--max-queue", queue, "--max-seq-len", context]
    elif engine == "llama-server":
        # Continuous batching over `--parallel` slots, each with its own `context` tokens of KV cache.
        cmd = [str(build_llama_server()), "--model", model, "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--threads", threads, "--threads-batch", threads, "--parallel", batch]
        cmd += ["--ctx-size", str(args.concurrency * args.context), "--no-webui", "--log-disable", "--metrics"]
    elif engine == "llama-cpp-python":
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
        # It runs one request at a time; by default a new request interrupts the one streaming: queue them instead.
        cmd += ["--n_ctx", context, "--interrupt_requests", "False"]
        cmd += ["--n_threads", threads, "--n_threads_batch", threads]
    else:
        raise SystemExit(f"unknown engine {engine!r}: lamina, llama-server or llama-cpp-python")
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


# ---------------------------------------------------------------------------------------------------------------------
# Requests


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """A streaming greedy completion: when it was sent, and when each of its tokens came."""
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


async def scored(client: httpx.AsyncClient, url: str, model: str, prompt: str, engine: str) -> dict:
    """What lm-eval's loglikelihood sends: the prompt echoed with its tokens' logprobs and one new token, answered in
    one piece. llama-server cannot return a prompt's logprobs (`echo` is not among its parameters): it gets the same
    prompt for one token, the same prefill without the scores."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 1}
    if engine != "llama-server":
        body["echo"] = True
    start = time.perf_counter()
    r = await client.post(f"{url}/v1/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
    return {"start": start, "end": time.perf_counter()}


# ---------------------------------------------------------------------------------------------------------------------
# Closed loop: `--concurrency` clients, each sending its next request when the last is answered


async def workload(url: str, model: str, args) -> dict:
    sem = asyncio.Semaphore(args.concurrency)

    async def limited(i):
        async with sem:
            prompt = TEXTS[i % len(TEXTS)] + " " + " ".join(TEXTS[: i % 3])
            return await one(client, url, model, prompt, args.max_tokens)

    async with httpx.AsyncClient(timeout=600, limits=NO_KEEPALIVE) as client:
        await one(client, url, model, "Hello", 4)  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*(limited(i) for i in range(args.requests)))
        wall = time.perf_counter() - start
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(len(r["times"]) for r in results)
    return {"wall": wall, "rps": args.requests / wall, "tps": tokens / wall, "tokens": tokens, "ttft": ttft, "itl": itl}


# ---------------------------------------------------------------------------------------------------------------------
# Open loop: requests arrive at random (Poisson) at a given rate, whether or not the server keeps up

WORDS = (  # noqa: SIM905
    "time year people way day man thing woman life child world school state family student group country problem "
    "hand part place case week company system program question work government number night point home water room "
    "mother area money story fact month lot right study book eye job word business issue side kind head house service "
    "friend father power hour game line end member law car city community name president team minute idea kid body "
    "information back parent face others level office door health person art war history party result change morning "
    "reason research girl guy moment air teacher force education river mountain garden letter market paper music "
    "table window light summer winter train bridge island forest village doctor"
).split()

# (kind, share of requests, prompt words (low, high), new tokens (low, high)): chat turns, long documents (a pasted
# page to summarize) and lm-eval's scoring requests. A word of WORDS is one or two tokens of a Llama tokenizer.
MIX = (
    ("chat", 0.55, (20, 200), (32, 128)),
    ("document", 0.30, (700, 1300), (16, 64)),
    ("scoring", 0.15, (100, 600), (1, 1)),
)


# A connection a request: a kept-alive connection that the server closes (llama-server after 5 s idle) just as the
# client sends on it fails the request ("Server disconnected without sending a response"), a client-side artifact.
NO_KEEPALIVE = httpx.Limits(max_connections=None, max_keepalive_connections=0)


def requests_mix(n: int, seed: int) -> list[dict]:
    """`n` requests drawn from MIX, each prompt its own random words (the prefix cache finds nothing to share)."""
    rng = random.Random(seed)
    kinds = [k for k, *_ in MIX]
    out = []
    for _ in range(n):
        kind = rng.choices(kinds, weights=[w for _, w, *_ in MIX])[0]
        _, _, (lo, hi), (tlo, thi) = next(m for m in MIX if m[0] == kind)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
        out.append({"kind": kind, "prompt": f"Summarize: {words}", "max_tokens": rng.randint(tlo, thi)})
    return out


async def send(client, url: str, model: str, req: dict, engine: str) -> dict:
    """One request of the mix; its kind, timings and error (None when it was answered)."""
    try:
        if req["kind"] == "scoring":
            got = await scored(client, url, model, req["prompt"], engine)
        else:
            got = await one(client, url, model, req["prompt"], req["max_tokens"])
            got["end"] = time.perf_counter()
        return {"kind": req["kind"], **got, "error": None}
    except (httpx.HTTPError, RuntimeError) as e:
        return {"kind": req["kind"], "error": f"{type(e).__name__}: {e}"}


async def closed_mix(url: str, model: str, engine: str, args) -> float:
    """Capacity: requests/s of the mix with `--concurrency` clients always waiting on an answer."""
    reqs = requests_mix(args.capacity_requests, args.seed + 1)
    sem = asyncio.Semaphore(args.concurrency)

    async def limited(req):
        async with sem:
            return await send(client, url, model, req, engine)

    async with httpx.AsyncClient(timeout=600, limits=NO_KEEPALIVE) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(limited(r) for r in reqs))
        wall = time.perf_counter() - start
    if errors := [r["error"] for r in results if r["error"]]:
        print(f"{engine}: {len(errors)} requests failed while measuring capacity: {errors[0]}", file=sys.stderr)
    return (len(reqs) - len(errors)) / wall


async def open_loop(url: str, model: str, engine: str, rate: float, args) -> dict:
    """`--requests` requests of the mix sent at Poisson arrivals of `rate` a second (the same draw for every server):
    the time to first token, the gaps between tokens, each request's end, and the errors."""
    reqs = requests_mix(args.requests, args.seed)
    rng = random.Random(args.seed)
    arrivals, at = [], 0.0
    for _ in reqs:
        at += rng.expovariate(rate)
        arrivals.append(at)

    async def timed(req, arrival, t0):
        await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
        return await send(client, url, model, req, engine)

    async with httpx.AsyncClient(timeout=900, limits=NO_KEEPALIVE) as client:
        await one(client, url, model, "Hello", 4)  # warm-up
        t0 = time.perf_counter()
        results = await asyncio.gather(*(timed(r, a, t0) for r, a in zip(reqs, arrivals)))
        wall = time.perf_counter() - t0
    return summarize(results, wall, rate, args)


def summarize(results: list[dict], wall: float, rate: float, args) -> dict:
    ok = [r for r in results if r["error"] is None]
    streams = [r for r in ok if r["kind"] != "scoring" and r["times"]]
    ttft = [r["times"][0] - r["start"] for r in streams]
    itl = [b - a for r in streams for a, b in zip(r["times"], r["times"][1:])]
    scoring = [r["end"] - r["start"] for r in ok if r["kind"] == "scoring"]

    def good(r) -> bool:  # within the SLO: a stream's first token and its mean gap; a scoring request's answer
        if r["kind"] == "scoring":
            return r["end"] - r["start"] <= args.slo_ttft
        gaps = len(r["times"]) - 1
        tpot = (r["times"][-1] - r["times"][0]) / gaps if gaps else 0.0
        return r["times"][0] - r["start"] <= args.slo_ttft and tpot <= args.slo_tpot

    return {
        "rate": rate,
        "wall": wall,
        "rps": len(ok) / wall,
        "goodput": sum(good(r) for r in ok if r["kind"] == "scoring" or r["times"]) / wall,
        "tps": sum(len(r["times"]) for r in streams) / wall,
        "ttft": ttft,
        "itl": itl,
        "scoring": scoring,
        "errors": len(results) - len(ok),
        "first_error": next((r["error"] for r in results if r["error"]), None),
    }


# ---------------------------------------------------------------------------------------------------------------------


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb / 1024


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


PERCENTILES = (50, 90, 99)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a llama GGUF file (default: the embedded SmolLM2)")
    parser.add_argument("--engines", default="lamina,llama-server", help="lamina, llama-server, llama-cpp-python")
    parser.add_argument("--open", action="store_true", help="open loop: Poisson arrivals of the mixed workload")
    parser.add_argument("--requests", type=int, default=None, help="requests a run (default: 64 closed, 160 open)")
    parser.add_argument("--concurrency", type=int, default=16, help="closed loop's clients; each server's batch")
    parser.add_argument("--max-tokens", type=int, default=64, help="closed loop: new tokens a request")
    parser.add_argument("--context", type=int, default=None, help="tokens a sequence (default: 1024 closed, 2048 open)")
    parser.add_argument(
        "--load",
        default="0.7",
        help="open loop: arrival rates as fractions of the first engine's measured capacity, comma-separated",
    )
    parser.add_argument("--rate", type=float, default=None, help="open loop: this arrival rate (requests/s) instead")
    parser.add_argument("--capacity-requests", type=int, default=48, help="open loop: requests to measure capacity")
    parser.add_argument("--slo-ttft", type=float, default=3.0, help="goodput: seconds to the first token (or answer)")
    parser.add_argument("--slo-tpot", type=float, default=0.1, help="goodput: mean seconds between tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--chart",
        default=None,
        help="the PNG chart (default: benchmarks/charts/serving.png, "
        "serving_open.png with --open; 'none' for no chart)",
    )
    args = parser.parse_args()
    args.requests = args.requests or (160 if args.open else 64)
    args.context = args.context or (2048 if args.open else 1024)
    args.chart = args.chart or str(charts.CHARTS / ("serving_open.png" if args.open else "serving.png"))
    if args.model is None:
        from lamina.loader import default_model_path

        args.model = str(default_model_path())
    if "llama-server" in args.engines:
        build_llama_server()  # before any server starts: a build would share the CPU with a measurement
    return (open_main if args.open else closed_main)(args)


def serve(engine: str, args, fn):
    """Start `engine`'s server, run `fn(url, served model name, proc)` against it, stop it."""
    print(f"running {engine} ...", file=sys.stderr, flush=True)
    port = free_port()
    proc = start(engine, args.model, port, args)
    try:
        served = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
        return fn(f"http://127.0.0.1:{port}", served, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def closed_main(args) -> int:
    name = os.path.basename(args.model)
    results = {}
    for engine in args.engines.split(","):

        def run(url, served, proc):
            out = asyncio.run(workload(url, served, args))
            return {**out, "rss": peak_rss_mb(proc.pid)}

        results[engine] = serve(engine, args, run)

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


def open_main(args) -> int:
    """Each server's capacity on the mix, then the mix at Poisson arrivals of each rate (the same rates for every
    server: fractions of the first engine's capacity, or `--rate`)."""
    name = os.path.basename(args.model)
    engines = args.engines.split(",")
    loads = [float(x) for x in args.load.split(",")]
    capacity: dict[str, float] = {}
    rates: list[float] = [args.rate] if args.rate else []
    results: dict[float, dict[str, dict]] = {}
    for engine in engines:

        def run(url, served, proc, engine=engine):
            asyncio.run(send_warmup(url, served, engine))
            capacity[engine] = asyncio.run(closed_mix(url, served, engine, args))
            print(f"{engine}: capacity {capacity[engine]:.2f} requests/s", file=sys.stderr, flush=True)
            if not rates:
                rates.extend(load * capacity[engine] for load in loads)
            for rate in rates:
                got = asyncio.run(open_loop(url, served, engine, rate, args))
                results.setdefault(rate, {})[engine] = {**got, "capacity": capacity[engine]}
                if got["errors"]:
                    print(f"{engine}: {got['errors']} errors, the first: {got['first_error']}", file=sys.stderr)

        serve(engine, args, run)

    machine = machine_line(args.threads)
    shares = ", ".join(f"{int(100 * share)}% {kind} ({lo}-{hi} words)" for kind, share, (lo, hi), _ in MIX)
    workload_line = (
        f"{args.requests} requests at Poisson arrivals: {shares}; greedy, streamed (scoring: echo + logprobs, "
        f"1 token); batch {args.concurrency}"
    )
    print(f"# {machine}, model {name}, {workload_line}")
    print(
        "capacity (requests/s, the mix with "
        f"{args.concurrency} clients always waiting): " + ", ".join(f"{e} {c:.2f}" for e, c in capacity.items())
    )
    print(
        f"goodput: requests/s answered within the SLO: first token (or a scoring answer) <= {args.slo_ttft:g} s and "
        f"a mean gap between tokens <= {1000 * args.slo_tpot:g} ms\n"
    )
    for rate, by_engine in results.items():
        loads_here = ", ".join(f"{e} {rate / capacity[e]:.0%}" for e in by_engine)
        print(f"## arrival rate {rate:.2f} requests/s (load: {loads_here})\n")
        rows = [
            ("requests/s answered", lambda r: r["rps"], False),
            ("goodput (requests/s)", lambda r: r["goodput"], False),
            ("output tokens/s", lambda r: r["tps"], False),
            *((f"time to first token p{q} (ms)", lambda r, q=q: 1000 * pct(r["ttft"], q), True) for q in PERCENTILES),
            *((f"inter-token latency p{q} (ms)", lambda r, q=q: 1000 * pct(r["itl"], q), True) for q in PERCENTILES),
            ("inter-token p99 / p50", lambda r: pct(r["itl"], 99) / pct(r["itl"], 50), True),
            *((f"scoring request p{q} (ms)", lambda r, q=q: 1000 * pct(r["scoring"], q), True) for q in (50, 99)),
            ("errors", lambda r: r["errors"], True),
        ]
        ratio_table(by_engine, rows)
        print()
    if args.chart != "none" and results:
        open_chart(results, f"{name}, Poisson arrivals of a mixed workload\n{machine}", args.chart)
    return 0


async def send_warmup(url: str, model: str, engine: str) -> None:
    """A request of each kind, so that no first-time cost lands in a measurement."""
    async with httpx.AsyncClient(timeout=600, limits=NO_KEEPALIVE) as client:
        for req in requests_mix(6, seed=12345):
            await send(client, url, model, req, engine)


def ratio_table(results: dict, rows: list) -> None:
    """A Markdown table of `rows` (label, value(result), lower_is_better) for each engine, then lamina's ratio to
    each other engine, oriented so that > 1 is better for lamina."""
    peers = [e for e in results if e != "lamina"]
    header = ["metric", *results, *(f"lamina / {p}" for p in peers)]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for label, value, lower_is_better in rows:
        row = [
            label,
            *(
                f"{value(r):.1f}" if not label.startswith("inter-token p99 /") else f"{value(r):.2f}"
                for r in results.values()
            ),
        ]
        for p in peers:
            if "lamina" in results:
                ours, theirs = value(results["lamina"]), value(results[p])
                if ours and theirs:
                    row.append(f"{(theirs / ours if lower_is_better else ours / theirs):.2f}x")
                else:
                    row.append("")
        print("| " + " | ".join(row) + " |")


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


def open_chart(results: dict, title: str, path: str) -> None:
    """For each arrival rate: goodput, time to first token and inter-token latency at each percentile, one bar per
    server."""
    fig, (good, ttft, itl) = charts.figure(3, title, width=4.6)
    if fig is None:
        return
    rates = list(results)
    engines = list(dict.fromkeys(e for by in results.values() for e in by))
    label = [f"{rate:.2f}/s" for rate in rates]
    charts.bars(
        good,
        label,
        {e: [results[x][e]["goodput"] for x in rates] for e in engines},
        "requests/s",
        "goodput (within the SLO)",
    )
    groups = [f"{rate:.2f}/s p{q}" for rate in rates for q in PERCENTILES]
    ms = {
        key: {e: [1000 * pct(results[x][e][key], q) for x in rates for q in PERCENTILES] for e in engines}
        for key in ("ttft", "itl")
    }
    charts.bars(ttft, groups, ms["ttft"], "ms (log scale)", "time to first token", log_y=True)
    charts.bars(itl, groups, ms["itl"], "ms (log scale)", "inter-token latency", log_y=True)
    charts.save(fig, path)


if __name__ == "__main__":
    sys.exit(main())
