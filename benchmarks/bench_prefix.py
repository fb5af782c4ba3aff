"""Prefix caching: `lamina serve` with and without it, against llama.cpp's OpenAI-compatible server
(llama-cpp-python[server] with its prompt cache, `--cache True`) on the same GGUF, same machine, same run.

    python benchmarks/bench_prefix.py [--model FILE.gguf] [--conversations 16] [--turns 8] [--system-tokens 1000]
                                      [--items 64] [--engines lamina,lamina-no-cache,llama.cpp]

(a) Multi-turn chat replay: `--conversations` concurrent conversations of `--turns` turns each, every one opening
    with the same system message of about `--system-tokens` tokens; each turn resends the whole conversation (the
    replies so far included: greedy, `--reply-tokens` tokens) through /v1/chat/completions, streaming.
(b) lm-eval-style scoring: `--items` items of one context and four continuations each, every continuation scored as
    lm-eval's local-completions scores it (prompt = context + continuation, echo, logprobs=1, max_tokens=1); the
    four continuations of an item arrive together, 16 requests in flight at most.

Per engine: time to first token (a: first turn, second turn, later turns), requests/s, and prompt tokens served
from the cache (lamina's /metrics, vLLM's prefix-cache counters; llama.cpp does not report it). Each part of each
engine runs on a fresh server (a cold cache) in
its own process. Ratios: lamina's against lamina without caching and against llama.cpp, each oriented so that > 1
is better for lamina (for times: theirs over ours).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import machine_line  # noqa: E402
from bench_serving import free_port, launch, peak_rss_mb, ratio_table  # noqa: E402

TOPICS = ["rivers", "bridges", "libraries", "volcanoes", "orchestras", "railways", "glaciers", "markets"]


def system_message(tokens: int) -> str:
    """A long system message: numbered house rules, about `tokens` tokens (~12 a rule on SmolLM2's tokenizer)."""
    rules = [
        f"Rule {i}: when the user asks about {TOPICS[i % len(TOPICS)]}, answer in plain words, cite no sources, "
        f"and keep to {3 + i % 5} sentences."
        for i in range(max(tokens // 25, 1))
    ]
    return "You are a careful assistant. Follow these house rules.\n" + "\n".join(rules)


def item(i: int) -> tuple[str, list[str]]:
    """An lm-eval-style item: a context (a short passage and a question) and four candidate answers."""
    topic = TOPICS[i % len(TOPICS)]
    context = (
        f"Passage {i}: The town council met on day {i % 28 + 1} to discuss the {topic} of the region. "
        "Members reviewed the budget, heard from residents, and agreed to publish a report before the winter. "
        f"The report on {topic} will list costs, risks and the people responsible for each task.\n"
        f"Question: What will the report on {topic} list?\nAnswer:"
    )
    answers = [" costs, risks and responsibilities", " the names of residents", " the weather", " nothing at all"]
    return context, answers


def start(engine: str, model: str, port: int, args, scoring: bool) -> subprocess.Popen:
    if engine.startswith("lamina"):
        cmd = [sys.executable, "-m", "lamina", "serve", "--model", model, "--port", str(port)]
        cmd += ["--max-batch-size", "16", "--max-seq-len", "4096", "--threads", str(args.threads)]
        cmd += ["--no-prefix-caching"] if engine == "lamina-no-cache" else []
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--interrupt_requests", "False", "--cache", "True"]
        # Prompt logprobs need every position's logits kept (n_ctx x vocab floats, saved with each cached state too):
        # only for the scoring part, where lm-eval needs them, with a context that fits its items (each cached state
        # then holds 100 MB of logits, not 800); the chat replay runs without, with the context it needs.
        cmd += ["--logits_all", "True", "--n_ctx", "512"] if scoring else ["--n_ctx", "4096"]
        cmd += ["--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)]
    return launch(engine, cmd, port)


async def stream(client: httpx.AsyncClient, url: str, path: str, body: dict) -> tuple[float, str]:
    """Send a streaming request; (seconds to its first token, the text)."""
    start, first, text = time.perf_counter(), None, []
    async with client.stream("POST", f"{url}{path}", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            piece = choices[0].get("delta", {}).get("content") or choices[0].get("text") or ""
            if piece and first is None:
                first = time.perf_counter() - start
            text.append(piece)
    return (first if first is not None else time.perf_counter() - start), "".join(text)


async def chat_replay(url: str, model: str, args) -> dict:
    system = {"role": "system", "content": system_message(args.system_tokens)}
    ttft: dict[int, list[float]] = {}

    async def conversation(c: int):
        messages = [system]
        for turn in range(args.turns):
            topic = TOPICS[(c + turn) % len(TOPICS)]
            messages.append({"role": "user", "content": f"Conversation {c}, turn {turn}: tell me about {topic}."})
            body = {"model": model, "messages": messages, "max_tokens": args.reply_tokens, "temperature": 0}
            seconds, reply = await stream(client, url, "/v1/chat/completions", body)
            ttft.setdefault(turn, []).append(seconds)
            messages.append({"role": "assistant", "content": reply})

    async with httpx.AsyncClient(timeout=3600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(conversation(c) for c in range(args.conversations)))
        wall = time.perf_counter() - start
    return {"wall": wall, "rps": args.conversations * args.turns / wall, "ttft": ttft}


async def scoring(url: str, model: str, args) -> dict:
    sem = asyncio.Semaphore(16)
    latency: list[float] = []

    async def score(prompt: str):
        async with sem:
            body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
            start = time.perf_counter()
            r = await client.post(f"{url}/v1/completions", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:500]}")
            if not r.json()["choices"][0]["logprobs"]["token_logprobs"]:
                raise RuntimeError("no prompt logprobs came back")
            latency.append(time.perf_counter() - start)

    async with httpx.AsyncClient(timeout=3600) as client:
        start = time.perf_counter()
        jobs = []
        for i in range(args.items):
            context, answers = item(i)
            jobs += [score(context + a) for a in answers]
        await asyncio.gather(*jobs)
        wall = time.perf_counter() - start
    return {"wall": wall, "rps": len(latency) / wall, "latency": latency}


def cache_counters(url: str) -> tuple[float, float] | None:
    """lamina's prefix-cache queries and hits (prompt tokens) so far; None for a server without them."""
    response = httpx.get(f"{url}/metrics")
    text = response.text if response.status_code == 200 else ""
    found = {}
    for line in text.splitlines():
        for name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
            if line.startswith(name + " "):
                found[name] = float(line.split()[-1])
    return (found["vllm:prefix_cache_queries_total"], found["vllm:prefix_cache_hits_total"]) if found else None


def p50(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a llama GGUF file (default: the embedded SmolLM2)")
    parser.add_argument("--engines", default="lamina,lamina-no-cache,llama.cpp")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--parts", default="chat,scoring", help="which of (a) chat, (b) scoring to run")
    args = parser.parse_args()
    if args.model is None:
        from lamina.loader import default_model_path

        args.model = str(default_model_path())

    results = {}
    for engine in args.engines.split(","):
        r = {}
        parts = [(part, work) for part, work in (("chat", chat_replay), ("scoring", scoring)) if part in args.parts]
        for part, work in parts:  # a fresh server (cold cache) for each
            print(f"running {engine}, {part} ...", file=sys.stderr, flush=True)
            port = free_port()
            proc = start(engine, args.model, port, args, scoring=part == "scoring")
            url = f"http://127.0.0.1:{port}"
            try:
                served = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
                r[part] = asyncio.run(work(url, served, args))
                r[part]["cached"] = cache_counters(url)
                r[part]["rss"] = peak_rss_mb(proc.pid)
                print(f"{engine} {part}: {json.dumps(r[part])}", file=sys.stderr, flush=True)  # kept should one fail
            except (RuntimeError, httpx.HTTPError) as e:
                print(f"{engine} {part} failed: {e}", file=sys.stderr, flush=True)
                break
            finally:
                proc.terminate()
                proc.wait(timeout=60)
        else:
            results[engine] = r

    print(
        f"# {machine_line(args.threads)}, model "
        f"{os.path.basename(args.model)}, Python {platform.python_version()}\n"
        f"# (a) {args.conversations} concurrent conversations x {args.turns} turns, a ~{args.system_tokens}-token "
        f"system message, {args.reply_tokens}-token greedy replies; (b) {args.items} items x 4 continuations scored "
        "(echo, logprobs, max_tokens 1), 16 in flight"
    )

    def saved(r, part):
        if r[part]["cached"] is None:
            return "n/a"
        queries, hits = r[part]["cached"]
        return f"{hits:.0f} of {queries:.0f} ({hits / max(queries, 1):.0%})"

    rows = [
        ("(a) TTFT, first turn, p50 (ms)", lambda r: 1000 * p50(r["chat"]["ttft"][0]), True),
        ("(a) TTFT, second turn, p50 (ms)", lambda r: 1000 * p50(r["chat"]["ttft"][1]), True),
        (
            "(a) TTFT, turns 2+, p50 (ms)",
            lambda r: 1000 * p50([t for k, v in r["chat"]["ttft"].items() if k for t in v]),
            True,
        ),
        ("(a) requests/s", lambda r: r["chat"]["rps"], False),
        ("(b) requests/s", lambda r: r["scoring"]["rps"], False),
        ("(b) latency p50 (ms)", lambda r: 1000 * p50(r["scoring"]["latency"]), True),
        ("(a) server peak RSS (MB)", lambda r: r["chat"]["rss"], True),
        ("(b) server peak RSS (MB)", lambda r: r["scoring"]["rss"], True),
    ]
    ran = [part for part in ("chat", "scoring") if all(part in r for r in results.values())]
    rows = [row for row in rows if {"(a)": "chat", "(b)": "scoring"}[row[0][:3]] in ran]
    ratio_table(results, rows)
    peers = [e for e in results if e != "lamina"]
    for part, label in (("chat", "(a) prompt tokens from the cache"), ("scoring", "(b) prompt tokens from the cache")):
        if part not in ran:
            continue
        print(f"| {label} | " + " | ".join(saved(r, part) for r in results.values()) + " |" + " |" * len(peers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
