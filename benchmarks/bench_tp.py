"""Tensor parallelism on this CPU: one process against N processes (torchrun, gloo, the cores shared out: one core a
rank on two cores), on a random GGUF with a published model's shapes (bench_memory.py's: Q4_1 layers, a tied Q8_0
embedding), same machine, same run.

    python benchmarks/bench_tp.py [--preset llama3.2-1b] [--layers 8] [--sizes 1,2] [--keep FILE.gguf]

Measured per size, on each decode path (lamina's C step, sharded under tensor parallelism, and the PyTorch forward):
decode tokens/s of 1 and 8 streams, prefill tokens/s of a 256-token prompt (in the C step where its int16 products are
the prefill's, as on AVX-512; else in PyTorch either way), and
every rank's RSS once loaded and at its peak against W/N (W: the file's tensor bytes) plus the RSS the rank had
before loading (the runtime: Python, PyTorch); the peak adds the work's transients (a prefill's dequantized weights
and activations, the KV cache). The ratios are against one process on the same path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import commit, cpu_line  # noqa: E402
from bench_memory import write_gguf  # noqa: E402

PROMPT = 256


def worker(args) -> None:
    import torch

    import lamina

    before_mb = _rss_mb()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(len(os.sched_getaffinity(0)) // world, 1))
    llama = lamina.load(args.model, max_seq_len=PROMPT + 64, max_batch_size=8, tensor_parallel_size=world)
    loaded_mb = _rss_mb()
    if args.no_native:
        llama.runner.native = None
    ids = llama.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 80, bos=False, eos=False)
    out = {}

    def decode(streams: int) -> float:
        prompts = [ids[i : i + 16] for i in range(streams)]
        first = None
        for _ in llama.stream(prompts, 32, temperature=0, ignore_eos=True):
            first = first or time.perf_counter()
        return streams * 31 / (time.perf_counter() - first)

    def prefill() -> float:
        start = time.perf_counter()
        llama.complete([ids[:PROMPT]], 1, temperature=0, ignore_eos=True)
        return PROMPT / (time.perf_counter() - start)

    for name, fn in (("decode@1", lambda: decode(1)), ("decode@8", lambda: decode(8)), ("prefill@256", prefill)):
        fn()  # warm-up
        out[name] = sorted(fn() for _ in range(args.runs))[args.runs // 2]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["runtime_rss_mb"] = before_mb
    out["loaded_rss_mb"] = loaded_mb
    rank = int(os.environ.get("RANK", "0"))
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(out))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(args, world: int, no_native: bool, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    me = [str(Path(__file__)), "--worker", "--model", args.model, "--runs", str(args.runs), "--out", str(out)]
    me += ["--no-native"] if no_native else []
    if world == 1:
        cmd = [sys.executable, *me]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world)]
        cmd += ["--master-addr", "127.0.0.1", "--master-port", str(port), *me]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"size {world} failed: {proc.stderr.strip()[-2000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3.2-1b")
    parser.add_argument("--layers", type=int, default=8, help="layers of the random model (default 8)")
    parser.add_argument("--sizes", default="1,2", help="tensor-parallel sizes to run (default 1,2)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", default=None, help="write the GGUF here and keep it (reused when it exists)")
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-native", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / "model.gguf"
        if not path.exists():
            write_gguf(path, args.preset, args.layers)
        args.model = str(path)
        from lamina.weights.gguf_file import read_gguf_file

        weights_mb = sum(t.data.nbytes for t in read_gguf_file(path).tensors.values()) / 1e6
        sizes = [int(s) for s in args.sizes.split(",")]
        results = {}
        for n in sizes:
            for path, no_native in (("C step", False), ("PyTorch", True)):
                results[f"{n}, {path}"] = run(args, n, no_native, Path(tmp) / f"tp{n}-{path[0]}")
    print(
        f"# {cpu_line()}, {len(os.sched_getaffinity(0))} cores shared out among the ranks, {date.today()}, commit "
        f"{commit()}, random {args.preset} shapes with {args.layers} layers ({weights_mb:.0f} MB of tensors), "
        f"median of {args.runs} runs, {platform.python_version()}"
    )
    names = list(results)
    ratios = [n for n in names if not n.startswith("1, ")]
    base = {n: "1, " + n.split(", ")[1] for n in ratios}
    print(
        "| metric | "
        + " | ".join(f"TP={n}" for n in names)
        + " | "
        + " | ".join(f"TP={n} / TP={base[n]}" for n in ratios)
        + " |"
    )
    print("|" + "---|" * (1 + len(names) + len(ratios)))
    for metric in ("decode@1", "decode@8", "prefill@256"):
        kind, size = metric.split("@")
        label = f"decode, {size} stream(s) (tok/s)" if kind == "decode" else f"prefill, {size} tokens (tok/s)"
        row = [f"{results[n][0][metric]:.1f}" for n in names]
        row += [f"{results[n][0][metric] / results[base[n]][0][metric]:.2f}x" for n in ratios if base[n] in results]
        print(f"| {label} | " + " | ".join(row) + " |")
    blank = " |" * len(ratios)
    for label, value in (
        ("peak RSS per rank (MB)", lambda r: r["peak_rss_mb"]),
        ("RSS before loading (MB)", lambda r: r["runtime_rss_mb"]),
        ("loaded: RSS above it (MB)", lambda r: r["loaded_rss_mb"] - r["runtime_rss_mb"]),
        ("peak RSS above it (MB)", lambda r: r["peak_rss_mb"] - r["runtime_rss_mb"]),
    ):
        print(
            f"| {label} | "
            + " | ".join(" / ".join(f"{value(r):.0f}" for r in results[n]) for n in names)
            + " |"
            + blank
        )
    print("| W / N (MB) | " + " | ".join(f"{weights_mb / int(n.split(',')[0]):.0f}" for n in names) + " |" + blank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
