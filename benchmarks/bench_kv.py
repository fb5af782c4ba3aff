"""The KV cache's dtype: tokens a given `kv_cache_memory` holds with each kind, and decode speed with each at a long
context, lamina against llama.cpp (llama-cpp-python) with the same cache kinds, same GGUF, same machine, same run.

    python benchmarks/bench_kv.py [--model FILE.gguf] [--memory 256M] [--context 1536] [--tokens 64] [--runs 3]

Each engine and kind runs in its own subprocess. Measured: tokens held by `--memory` bytes (lamina's pool: blocks x
block size), decode tokens/s of one stream after a `--context`-token prompt (the attention reads the whole cache
every step: the cache's kind shows), and of 8 such streams (lamina only: llama-cpp-python serves one). llama.cpp
runs its f16 cache (its default) and q8_0 keys and values (which need its flash attention); ratios are lamina's
tokens/s over llama.cpp's with the same kind.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import charts  # noqa: E402
from bench_generate import machine_line  # noqa: E402

KINDS = ["f32", "f16", "bf16", "q8_0"]
TEXT = "The quick brown fox jumps over the lazy dog while the river runs to the sea. " * 400


def lamina_worker(args) -> dict:
    import torch

    import lamina

    torch.set_num_threads(args.threads)
    out = {}
    held = lamina.load(
        args.model, max_seq_len=args.context + args.tokens, kv_cache_memory=args.memory, kv_cache_dtype=args.kind
    )
    out["held"] = held.core.pool.num_blocks * held.core.pool.block_size
    del held
    llama = lamina.load(
        args.model,
        max_seq_len=args.context + args.tokens,
        max_batch_size=8,
        kv_cache_dtype=args.kind,
        prefix_caching=False,
    )
    ids = llama.tokenizer.encode(TEXT, bos=False, eos=False)[: args.context]

    def decode(streams: int) -> float:
        """Tokens/s of `streams` streams decoding together: the clock starts once every stream has its first token
        (the prefills are over) and counts the tokens made after that."""
        prompts = [ids[i:] + ids[:i] for i in range(streams)]  # distinct prompts of the same length
        started, start, made = set(), None, 0
        for delta in llama.stream(prompts, args.tokens, temperature=0, ignore_eos=True):
            if start is not None:
                made += 1
                continue
            started.add(delta.index)
            if len(started) == streams:
                start = time.perf_counter()
        return made / (time.perf_counter() - start)

    for streams in (1, 8):
        decode(streams)  # warm-up
        out[f"decode@{streams}"] = statistics.median(decode(streams) for _ in range(args.runs))
    return out


def llama_cpp_worker(args) -> dict:
    import llama_cpp

    types = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
    llm = llama_cpp.Llama(
        args.model,
        n_ctx=args.context + args.tokens + 8,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        type_k=types[args.kind],
        type_v=types[args.kind],
        flash_attn=args.kind == "q8_0",
        verbose=False,
    )
    ids = llm.tokenize(TEXT.encode(), add_bos=False)[: args.context]

    def decode() -> float:
        llm.reset()
        first, n = None, 0
        for _ in llm.generate(ids, temp=0.0, reset=True):
            first = first or time.perf_counter()
            n += 1
            if n == args.tokens:
                break
        return (args.tokens - 1) / (time.perf_counter() - first)

    decode()
    return {"decode@1": statistics.median(decode() for _ in range(args.runs))}


def run(engine: str, kind: str, args) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", engine, "--kind", kind, "--model", args.model]
    cmd += ["--memory", str(args.memory), "--context", str(args.context), "--tokens", str(args.tokens)]
    cmd += ["--runs", str(args.runs), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{engine} {kind} failed: {proc.stderr.strip()[-1500:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--memory", type=size, default=size("256M"))
    parser.add_argument("--context", type=int, default=1536)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    charts.add_option(parser, __file__)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kind", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from lamina.loader import default_model_path

        args.model = str(default_model_path())
    if args.worker:
        print(json.dumps((lamina_worker if args.worker == "lamina" else llama_cpp_worker)(args)))
        return 0
    ours = {kind: run("lamina", kind, args) for kind in KINDS}
    theirs = {kind: run("llama.cpp", kind, args) for kind in ("f16", "q8_0")}
    machine = machine_line(args.threads)
    print(
        f"# {machine}, model {os.path.basename(args.model)}, {args.context}-token context, {args.tokens} new tokens, "
        f"median of {args.runs}, Python {platform.python_version()}"
    )
    print(
        "| KV cache | tokens in "
        + f"{args.memory / 2**20:.0f} MB | lamina 1 stream (tok/s) | lamina 8 streams (tok/s) "
        "| llama.cpp 1 stream (tok/s) | lamina / llama.cpp, 1 stream |"
    )
    print("|---|---|---|---|---|---|")
    for kind in KINDS:
        r, t = ours[kind], theirs.get(kind)
        if r is None:
            print(f"| {kind} | failed | | | | |")
            continue
        peer = f"{t['decode@1']:.1f}" if t else "n/a"
        ratio = f"{r['decode@1'] / t['decode@1']:.2f}x" if t else ""
        print(f"| {kind} | {r['held']} | {r['decode@1']:.1f} | {r['decode@8']:.1f} | {peer} | {ratio} |")
    if args.chart != "none":
        title = f"{os.path.basename(args.model)}: KV-cache dtypes, {args.context}-token context\n{machine}"
        chart(ours, theirs, args, title)
    return 0


def chart(ours: dict, theirs: dict, args, title: str) -> None:
    """Tokens the cache holds in --memory, and decode tokens/s, for each KV-cache dtype."""
    fig, (held, speed) = charts.figure(2, title)
    if fig is None:
        return
    kinds = [k for k in KINDS if ours.get(k)]
    charts.bars(
        held,
        kinds,
        {"lamina": [ours[k]["held"] for k in kinds]},
        "tokens",
        f"tokens held in {args.memory / 2**20:.0f} MB",
    )
    speeds = {
        "lamina, 1 stream": [ours[k]["decode@1"] for k in kinds],
        "lamina, 8 streams": [ours[k]["decode@8"] for k in kinds],
        "llama.cpp, 1 stream": [theirs[k]["decode@1"] if theirs.get(k) else None for k in kinds],
    }
    charts.bars(speed, kinds, speeds, "tokens/s", "decode (median)")
    charts.save(fig, args.chart)


if __name__ == "__main__":
    sys.exit(main())
