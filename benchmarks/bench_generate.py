"""Generation speed of lamina against llama.cpp (llama-cpp-python) and transformers on the same GGUF, same machine,
same run. Each engine runs in its own subprocess (so peak RSS is its own); each figure is the median of --runs, with
min-max, and every lamina figure is printed as a ratio to each peer.

    python benchmarks/bench_generate.py [--model FILE.gguf] [--runs 3] [--streams 1,4,16,64] [--prefill 128,512,2048]
                                        [--chart benchmarks/charts/generate.png]

Measured: decode tokens/s for 1 and N concurrent streams (aggregate), prefill tokens/s for a prompt of L tokens, time
to first token of a 128-token prompt, peak RSS. Beside the table, a chart (benchmarks/charts/generate.png): decode
tokens/s against streams and prefill tokens/s against prompt length, each engine a line. The first line names the
CPU (model and the instruction sets that matter here), the commit, and lamina's kernel path and prefill dtype
(`--kernel-path`, `--prefill-dtype` force them). lamina runs with its prefix cache off (each prompt is repeated).
Engines that are not installed are reported as skipped.

llama.cpp: the installed llama-cpp-python (`--llama-cpp installed`, the default when it imports), or one built from
source for this machine into benchmarks/.llama-cpp/ (`--llama-cpp build`; ~10-20 minutes once, then reused). Where its
AMX code stops with an illegal instruction (llama-cpp-python 0.3.36 does on Sapphire Rapids: `tilezero` in
ggml_backend_amx_mul_mat), the benchmark says so and runs a build without AMX (-mno-amx-tile -mno-amx-int8
-mno-amx-bf16), so the peer is at its best that works.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import charts  # noqa: E402

DECODE_PROMPT = 16  # tokens in each decode prompt
LLAMA_CPP_VERSION = "0.3.36"
LLAMA_CPP_BUILDS = Path(__file__).with_name(".llama-cpp")
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def cpu_line() -> str:
    """The CPU's model name and the instruction sets lamina's paths and its peers care about."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in (platform.processor(), platform.machine()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    return f"{model} ({' '.join(f for f in wanted if f in flags) or 'no AVX2'})"


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine_line(threads: int) -> str:
    """What a table's first line and a chart's title say of the run: the CPU, threads, date and commit."""
    return f"{cpu_line()}, {threads} threads, {date.today()}, commit {commit()}"


def gemm_rate(dtype: str, dim: int, hidden: int) -> float:
    """GFLOP/s of PyTorch's own GEMM (oneDNN / MKL: AMX tiles for bfloat16 where the CPU has them) on a prefill-shaped
    product, [512, dim] x [dim, hidden], in `dtype`: the rate this CPU reaches for the instruction set that dtype
    runs on, which lamina's prefill is compared against."""
    import torch
    import torch.nn.functional as F

    x, w = torch.randn(512, dim, dtype=getattr(torch, dtype)), torch.randn(hidden, dim, dtype=getattr(torch, dtype))
    for _ in range(3):
        F.linear(x, w)
    best = float("inf")
    for _ in range(20):  # ~2 ms each: best of 5 read half the rate now and then (Zen 4, just after loading)
        start = time.perf_counter()
        F.linear(x, w)
        best = min(best, time.perf_counter() - start)
    return 2 * 512 * dim * hidden / best / 1e9


def build_llama_cpp(variant: str) -> Path:
    """llama-cpp-python built from source for this machine into benchmarks/.llama-cpp/<variant> (reused once there):
    "native" (-DGGML_NATIVE=ON: every instruction set the CPU has, AMX included), "no-amx" (the same without AMX)."""
    target = LLAMA_CPP_BUILDS / f"{variant}-{LLAMA_CPP_VERSION}"
    if (target / "llama_cpp").is_dir():
        return target
    flags = "-DGGML_NATIVE=ON" + (
        f" -DCMAKE_C_FLAGS='{NO_AMX}' -DCMAKE_CXX_FLAGS='{NO_AMX}'" if variant == "no-amx" else ""
    )
    print(f"building llama-cpp-python {LLAMA_CPP_VERSION} ({variant}) into {target} ...", file=sys.stderr, flush=True)
    env = dict(os.environ, CMAKE_ARGS=flags, FORCE_CMAKE="1")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-binary", "llama-cpp-python", "--no-deps", "--target"]
    subprocess.run([*cmd, str(target), f"llama-cpp-python=={LLAMA_CPP_VERSION}"], env=env, check=True)
    return target


def worker(args) -> dict:
    """Run one engine's measurements in this process and return them."""
    import torch

    torch.set_num_threads(args.threads)
    out: dict = {"engine": args.worker}
    engine = {"lamina": LaminaEngine, "llama.cpp": LlamaCppEngine, "transformers": TransformersEngine}[args.worker]
    e = engine(args)
    out.update(getattr(e, "info", {}))
    ids = e.token_ids("The quick brown fox jumps over the lazy dog. " * 400)
    for name, fn in [("decode", e.decode), ("prefill", e.prefill), ("ttft", e.ttft)]:
        sizes = args.streams if name == "decode" else args.prefill if name == "prefill" else [128]
        for size in sizes:
            try:
                start = time.perf_counter()
                fn(ids, size)  # warm-up (and compile, where an engine compiles)
                out.setdefault("warmup_s", time.perf_counter() - start)
                values = [fn(ids, size) for _ in range(args.runs)]
                out[f"{name}@{size}"] = values
            except NotImplementedError:
                pass
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


class LaminaEngine:
    def __init__(self, args):
        import lamina

        batch = max(args.streams)
        self.llama = lamina.load(
            args.model,
            dtype=args.dtype,
            max_batch_size=batch,
            quantize=args.quantize,
            compile=args.compile,
            max_seq_len=max(max(args.prefill) + 8, DECODE_PROMPT + args.tokens + 8),
            kernel_path=args.kernel_path,
            prefill_dtype=args.prefill_dtype,
            # Every run here repeats its prompt: with the prefix cache on, a repeat would compute one block, not
            # the prompt (the peers recompute it). bench_prefix measures the cache.
            prefix_caching=False,
        )
        self.tokens = args.tokens
        from lamina.quant import QLinear, kernel_path

        prefill = {str(m.prefill_dtype) for m in self.llama.model.modules() if isinstance(m, QLinear)}
        self.info = {
            "kernel_path": kernel_path(self.llama.model) or "none (PyTorch)",
            "prefill_dtype": ",".join(prefill),
        }
        c = self.llama.model.config
        # Prefill arithmetic per token: 2 flops per weight of the layers' projections (the logits of one token are
        # negligible), plus attention's 4 * H * D per (query, key) pair, causal: about L / 2 keys a query.
        layers = self.llama.model.layers.modules()
        self.info["flops_per_token"] = 2 * sum(
            m.in_features * m.out_features for m in layers if hasattr(m, "in_features")
        )
        self.info["attention_flops"] = 4 * c.n_layers * c.n_heads * c.head_dim / 2  # times L^2
        gemm = "int16" if "torch.int16" in prefill else next(iter(prefill)).removeprefix("torch.")
        # lamina's int16 kernels are held to the rate of the bfloat16 GEMM, the fastest this CPU's PyTorch has
        self.info["gemm_dtype"] = "bfloat16" if gemm == "int16" else gemm
        self.info["gemm_peak"] = gemm_rate(self.info["gemm_dtype"], c.dim, c.hidden_dim)

    def token_ids(self, text):
        return self.llama.tokenizer.encode(text, bos=False, eos=False)

    def decode(self, ids, streams):
        prompts = [ids[i : i + DECODE_PROMPT] for i in range(streams)]
        first = None
        for delta in self.llama.stream(prompts, self.tokens, temperature=0, ignore_eos=True):
            if first is None:
                first = time.perf_counter()
        return streams * (self.tokens - 1) / (time.perf_counter() - first)

    def prefill(self, ids, length):
        start = time.perf_counter()
        self.llama.complete([ids[:length]], 1, temperature=0, ignore_eos=True)
        return length / (time.perf_counter() - start)

    def ttft(self, ids, length):
        start = time.perf_counter()
        next(iter(self.llama.stream([ids[:length]], 1, temperature=0, ignore_eos=True)))
        return (time.perf_counter() - start) * 1000


class LlamaCppEngine:
    def __init__(self, args):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise SystemExit("llama-cpp-python is not installed (pip install llama-cpp-python)")
        self.llm = Llama(
            args.model,
            n_ctx=max(max(args.prefill) + 8, DECODE_PROMPT + args.tokens + 8),
            n_threads=args.threads,
            n_threads_batch=args.threads,
            n_batch=2048,
            verbose=False,
        )
        self.tokens = args.tokens

    def token_ids(self, text):
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)

    def decode(self, ids, streams):
        if streams != 1:
            raise NotImplementedError  # llama-cpp-python's API runs one sequence at a time
        self.llm.reset()
        self.llm.eval(ids[:DECODE_PROMPT])
        start = time.perf_counter()
        for _ in range(self.tokens - 1):
            token = self.llm.sample(temp=0.0)
            self.llm.eval([token])
        return (self.tokens - 1) / (time.perf_counter() - start)

    def prefill(self, ids, length):
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids[:length])
        return length / (time.perf_counter() - start)

    def ttft(self, ids, length):
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids[:length])
        self.llm.sample(temp=0.0)
        return (time.perf_counter() - start) * 1000


class TransformersEngine:
    def __init__(self, args):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        folder, name = os.path.split(args.model)
        dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16}.get(args.hf_dtype, torch.float32)
        self.tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        self.model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype).eval()
        self.tokens = args.tokens
        self.torch = torch

    def token_ids(self, text):
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids, streams):
        torch = self.torch
        batch = torch.tensor([ids[i : i + DECODE_PROMPT] for i in range(streams)])
        with torch.inference_mode():
            start = time.perf_counter()
            self.model.generate(batch, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            first = time.perf_counter() - start
            start = time.perf_counter()
            self.model.generate(batch, max_new_tokens=self.tokens, min_new_tokens=self.tokens, do_sample=False)
            total = time.perf_counter() - start
        return streams * (self.tokens - 1) / (total - first)

    def prefill(self, ids, length):
        torch = self.torch
        with torch.inference_mode():
            start = time.perf_counter()
            self.model(torch.tensor([ids[:length]]), logits_to_keep=1)
        return length / (time.perf_counter() - start)

    def ttft(self, ids, length):
        torch = self.torch
        with torch.inference_mode():
            start = time.perf_counter()
            self.model.generate(torch.tensor([ids[:length]]), max_new_tokens=1, do_sample=False)
        return (time.perf_counter() - start) * 1000


def run_engine(engine: str, cmd: list[str], args) -> tuple[subprocess.CompletedProcess, str]:
    """One engine's worker process, and a note on which llama.cpp build ran: the one asked for, and again without AMX
    where its AMX code crashes."""
    if engine != "llama.cpp":
        return subprocess.run(cmd, capture_output=True, text=True), ""
    choice = args.llama_cpp or ("installed" if _imports("llama_cpp") else "build")
    env = dict(os.environ)
    if choice == "build":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(build_llama_cpp("native")), env.get("PYTHONPATH")]))
    note = f", llama.cpp {'installed' if choice == 'installed' else 'built here (native)'}"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode in (-signal.SIGILL, 128 + signal.SIGILL) and "amx_tile" in cpu_line() + _flags():
        print(
            "  llama.cpp stopped with an illegal instruction (its AMX code); running a build without AMX",
            file=sys.stderr,
        )
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(build_llama_cpp("no-amx")), os.environ.get("PYTHONPATH")])
        )
        note = ", llama.cpp built here without AMX (its AMX build crashed: SIGILL)"
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return proc, note


def _imports(module: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def _flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""


def summarize(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a llama GGUF file (default: the embedded SmolLM2)")
    parser.add_argument("--engines", default="lamina,llama.cpp,transformers")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per decode run")
    parser.add_argument("--streams", default="1,4,16,64")
    parser.add_argument("--prefill", default="128,512,2048")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--dtype", default=None, help="lamina's dtype (default: lamina's choice)")
    parser.add_argument(
        "--quantize", default=None, help="lamina's weight storage (none, gguf, int8, int4; default: lamina's choice)"
    )
    parser.add_argument("--compile", action="store_true", help="compile lamina's decode step")
    parser.add_argument(
        "--kernel-path", default=None, help="lamina's kernel path (portable, avx2, avx512; default: best)"
    )
    parser.add_argument("--prefill-dtype", default=None, help="lamina's prefill arithmetic (int16, float32, bfloat16)")
    parser.add_argument(
        "--llama-cpp", default=None, choices=["installed", "build"], help="llama-cpp-python as installed, or built here"
    )
    parser.add_argument("--hf-dtype", default="bf16", help="transformers' dtype: bf16 or fp32")
    charts.add_option(parser, __file__)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.streams = [int(s) for s in str(args.streams).split(",")]
    args.prefill = [int(s) for s in str(args.prefill).split(",")]
    if args.model is None:
        from lamina.loader import default_model_path

        args.model = str(default_model_path())
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    results, llama_cpp_note = {}, ""
    for engine in args.engines.split(","):
        cmd = (
            [
                sys.executable,
                __file__,
                "--worker",
                engine,
                "--model",
                args.model,
                "--runs",
                str(args.runs),
                "--tokens",
                str(args.tokens),
                "--streams",
                ",".join(map(str, args.streams)),
                "--prefill",
                ",".join(map(str, args.prefill)),
                "--threads",
                str(args.threads),
                "--hf-dtype",
                args.hf_dtype,
            ]
            + (["--dtype", args.dtype] if args.dtype else [])
            + (["--quantize", args.quantize] if args.quantize else [])
            + (["--compile"] if args.compile else [])
            + (["--kernel-path", args.kernel_path] if args.kernel_path else [])
            + (["--prefill-dtype", args.prefill_dtype] if args.prefill_dtype else [])
        )
        print(f"running {engine} ...", file=sys.stderr, flush=True)
        proc, note = run_engine(engine, cmd, args)
        llama_cpp_note += note
        if proc.returncode != 0:
            print(f"  {engine} skipped: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}", file=sys.stderr)
            continue
        results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])

    mine = results.get("lamina", {})
    machine = machine_line(args.threads)
    print(
        f"# {machine}, "
        f"model {os.path.basename(args.model)}, lamina dtype {args.dtype or 'default'}, "
        f"lamina weights {args.quantize or 'default'}{', compiled decode' if args.compile else ''}, "
        f"lamina kernel path {mine.get('kernel_path', '-')}, prefill products {mine.get('prefill_dtype', '-')}, "
        f"transformers {args.hf_dtype}{llama_cpp_note}, median (min-max) of {args.runs} runs"
    )
    metrics = sorted(
        {k for r in results.values() for k in r if "@" in k}, key=lambda k: (k.split("@")[0], int(k.split("@")[1]))
    )
    units = {"decode": "tok/s", "prefill": "tok/s", "ttft": "ms"}
    peers = [e for e in results if e != "lamina"]
    header = ["metric"] + list(results) + [f"lamina / {p}" for p in peers]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for m in metrics:
        kind, size = m.split("@")
        label = {
            "decode": f"decode, {size} stream(s)",
            "prefill": f"prefill, {size} tokens",
            "ttft": f"time to first token, {size}-token prompt",
        }[kind]
        row = [f"{label} ({units[kind]})"]
        for e in results:
            row.append("%.1f (%.1f-%.1f)" % summarize(results[e][m]) if m in results[e] else "-")
        for p in peers:
            if m in results.get("lamina", {}) and m in results[p]:
                ours, theirs = summarize(results["lamina"][m])[0], summarize(results[p][m])[0]
                ratio = theirs / ours if kind == "ttft" else ours / theirs  # > 1 means lamina is better
                row.append(f"{ratio:.2f}x")
            else:
                row.append("-")
        print("| " + " | ".join(row) + " |")
    print(
        "| first decode run incl. compiling (s) | "
        + " | ".join(f"{results[e].get('warmup_s', 0):.1f}" for e in results)
        + " |"
        + " |" * len(peers)
    )
    if "flops_per_token" in mine:
        for m in metrics:
            kind, size = m.split("@")
            if kind == "prefill" and m in mine:
                L = int(size)
                flops = L * mine["flops_per_token"] + L * L * mine["attention_flops"]
                rate = summarize(mine[m])[0] / L * flops / 1e9
                print(
                    f"| lamina prefill, {L} tokens (GFLOP/s) | {rate:.0f} ({rate / mine['gemm_peak']:.0%} of this "
                    f"CPU's {mine['gemm_dtype']} GEMM, {mine['gemm_peak']:.0f}) |"
                    + " |"
                    * (len(results) - 1 + len(peers))
                )
    print(
        "| peak RSS (MB) | "
        + " | ".join(f"{results[e]['peak_rss_mb']:.0f}" for e in results)
        + " |"
        + " |" * len(peers)
    )
    if args.chart != "none" and results:
        chart(results, args, machine)
    return 0


def chart(results: dict, args, machine: str) -> None:
    """Decode tokens/s against streams and prefill tokens/s against prompt length, one line per engine."""
    fig, (decode, prefill) = charts.figure(2, f"{os.path.basename(args.model)}: generation speed\n{machine}")
    if fig is None:
        return

    def series(kind: str) -> dict:
        return {
            e: {int(k.split("@")[1]): summarize(v) for k, v in r.items() if k.startswith(kind + "@")}
            for e, r in results.items()
        }

    label = {"transformers": f"transformers {args.hf_dtype}"}
    named = {kind: {label.get(e, e): s for e, s in series(kind).items()} for kind in ("decode", "prefill")}
    charts.lines(
        decode,
        args.streams,
        named["decode"],
        "concurrent streams",
        "tokens/s (all streams)",
        "decode (median, min-max)",
        log_x=True,
    )
    charts.lines(
        prefill,
        args.prefill,
        named["prefill"],
        "prompt length (tokens)",
        "prompt tokens/s",
        "prefill (median, min-max)",
        log_x=True,
    )
    charts.save(fig, args.chart)


if __name__ == "__main__":
    sys.exit(main())
