"""lamina against llama.cpp (llama-cpp-python) and transformers at real model sizes: random-weight GGUF files of
Llama-3.2-1B's and Llama-3.1-8B's shapes, with Llama 3's real tokenizer, quantized by llama.cpp's own quantizer.

    python benchmarks/bench_gguf.py [--shapes 1b,8b] [--types Q4_K_M,Q6_K,Q8_0]
                                    [--engines lamina,llama.cpp,transformers] [--new-tokens 64] [--runs 3]
                                    [--prompt-len 512] [--threads 2] [--llama-cpp installed|build] [--make-only]
                                    [--chart benchmarks/charts/gguf.png]

The files: made once and cached in benchmarks/.models/ (gitignored). Each shape's weights are drawn from a normal
distribution (std 0.02, norms 1.0, seeded by tensor name, so a file made again is the same file), written as F16
with the `gguf` writer one tensor at a time (the 8B shape's 16 GB never sit in memory), then quantized by
`llama_cpp.llama_model_quantize` into Q4_K_M, Q6_K and Q8_0; the F16 file is deleted once they exist. The vocabulary
is Llama 3's (the `llama-models` package's tokenizer.model) as llama.cpp's converter writes it: byte-level BPE tokens,
merges, token types, bos/eos, pre-tokenizer "llama-bpe"; RoPE scaling as llama.cpp writes it (`rope_freqs.weight`).

Measured, each engine in its own process with --threads threads: decode tokens/s of 1 and 8 streams (--new-tokens
after a 16-token prompt, a short warm-up first), prefill tokens/s of a --prompt-len prompt, peak RSS (VmHWM) after
loading and after the runs. In the same run: this machine's read bandwidth (torch.sum over 1 GiB of float32, best
of 5), and beside each one-stream figure the bound it gives, bandwidth / bytes a token reads (every layer projection
and the output projection as the file stores them: read from the file's tensor infos), and the engine's share of it.

- lamina: `lamina.load` with its defaults (prefix caching off: each prompt is repeated), 1 and 8 streams, prefill.
  A file whose weights lamina would widen to float32 beyond the memory available is refused before loading.
- llama.cpp: one stream and prefill; llama-cpp-python serves one sequence at a time, so it has no 8-stream figure.
  `--llama-cpp installed` (the default where it imports) or `build`: built here from source into benchmarks/.llama-cpp/
  (bench_generate's build_llama_cpp; without AMX on CPUs with AMX, where its AMX code stops with SIGILL).
- transformers: bfloat16, 8 streams only (the batched peer), a model of the same shape randomly initialised from a
  LlamaConfig (no GGUF); skipped where its bfloat16 weights do not fit in the memory available.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))
import charts  # noqa: E402
from bench_generate import (  # noqa: E402
    DECODE_PROMPT,
    LLAMA_CPP_VERSION,
    LaminaEngine,
    LlamaCppEngine,
    TransformersEngine,
    build_llama_cpp,
    cpu_line,
    machine_line,
    summarize,
)

MODELS = Path(__file__).with_name(".models")
TYPES = ("Q4_K_M", "Q6_K", "Q8_0")  # llama.cpp file types: LLAMA_FTYPE_MOSTLY_<name>
ENGINES = ("lamina", "llama.cpp", "transformers")
STREAMS = (1, 8)
WARMUP_TOKENS = 8  # new tokens of each decode warm-up
TEXT = "The quick brown fox jumps over the lazy dog. "  # about 10 tokens; repeated to the lengths needed
STD = 0.02  # of every random matrix
LLAMA_BOS, LLAMA_EOS = 128000, 128001  # <|begin_of_text|>, <|end_of_text|> (the base models' eos)
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
SKIPPED = 3  # a worker's exit status when it refuses a run (its last stderr line says why)


@dataclass(frozen=True)
class Shape:
    """A Llama 3 model's shape: what the GGUF's metadata and the LlamaConfig of the peer say."""

    name: str
    label: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    tied: bool  # the output projection is the token embedding (no output.weight)
    rope_factor: float  # Llama 3.1 RoPE scaling (low 1, high 4, original context 8192)
    vocab_size: int = 128256
    rope_theta: float = 500000.0
    context_length: int = 131072
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


SHAPES = {
    s.name: s
    for s in (
        Shape("tiny", "tiny (2 layers, dim 512)", 512, 2, 8, 2, 1536, tied=True, rope_factor=32.0),
        Shape("1b", "Llama-3.2-1B shape", 2048, 16, 32, 8, 8192, tied=True, rope_factor=32.0),
        Shape("8b", "Llama-3.1-8B shape", 4096, 32, 32, 8, 14336, tied=False, rope_factor=8.0),
    )
}


# ---- the files ----------------------------------------------------------------------------------------------------


def model_path(shape: Shape, ftype: str) -> Path:
    return MODELS / f"llama3-{shape.name}-random-{ftype}.gguf"


def tensor_shapes(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, row-major shape) of every tensor, in the order llama.cpp's converter writes them."""
    kv = shape.n_kv_heads * shape.head_dim
    out = [("token_embd.weight", (shape.vocab_size, shape.dim)), ("rope_freqs.weight", (shape.head_dim // 2,))]
    for i in range(shape.n_layers):
        out += [
            (f"blk.{i}.attn_norm.weight", (shape.dim,)),
            (f"blk.{i}.attn_q.weight", (shape.dim, shape.dim)),
            (f"blk.{i}.attn_k.weight", (kv, shape.dim)),
            (f"blk.{i}.attn_v.weight", (kv, shape.dim)),
            (f"blk.{i}.attn_output.weight", (shape.dim, shape.dim)),
            (f"blk.{i}.ffn_norm.weight", (shape.dim,)),
            (f"blk.{i}.ffn_gate.weight", (shape.hidden_dim, shape.dim)),
            (f"blk.{i}.ffn_up.weight", (shape.hidden_dim, shape.dim)),
            (f"blk.{i}.ffn_down.weight", (shape.dim, shape.hidden_dim)),
        ]
    out.append(("output_norm.weight", (shape.dim,)))
    if not shape.tied:
        out.append(("output.weight", (shape.vocab_size, shape.dim)))
    return out


def rope_factors(shape: Shape) -> list[float]:
    """Llama 3.1 RoPE scaling as per-frequency divisors, computed as llama.cpp's convert_hf_to_gguf.py does."""
    low, high, original = 1.0, 4.0, 8192
    out = []
    for i in range(0, shape.head_dim, 2):
        wavelen = 2 * math.pi * shape.rope_theta ** (i / shape.head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(shape.rope_factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / shape.rope_factor + smooth))
    return out


def llama3_vocab() -> tuple[list[str], list[int], list[str]]:
    """Llama 3's tokenizer as GGUF's gpt2-style BPE (tokens, token types, merges), as llama.cpp's converter writes it
    from the tokenizer.json that transformers' TikTokenConverter makes of Meta's tokenizer.model."""
    import llama_models
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from lamina.tokenizer.llama3 import Llama3Tokenizer

    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise SystemExit(f"Llama 3's tokenizer.model is not at {path}: pip install llama-models==0.3.0")
    vocab, merges = TikTokenConverter(str(path)).extract_vocab_merges_from_model(str(path))
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    specials = Llama3Tokenizer(path).special_tokens
    tokens += sorted(specials, key=specials.__getitem__)
    types = [1] * len(vocab) + [3] * len(specials)  # NORMAL; CONTROL for every special token
    return tokens, types, [f"{a} {b}" for a, b in merges]


def write_f16(shape: Shape, path: Path, threads: int) -> None:
    """The shape's random weights as an F16 GGUF (norms and RoPE factors F32), written one tensor at a time."""
    import gguf
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    tokens, types, merges = llama3_vocab()
    assert len(tokens) == shape.vocab_size
    tmp = path.with_suffix(".part")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(f"random {shape.label}")
    w.add_context_length(shape.context_length)
    w.add_embedding_length(shape.dim)
    w.add_block_count(shape.n_layers)
    w.add_feed_forward_length(shape.hidden_dim)
    w.add_head_count(shape.n_heads)
    w.add_head_count_kv(shape.n_kv_heads)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(shape.norm_eps)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_vocab_size(shape.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(LLAMA_BOS)
    w.add_eos_token_id(LLAMA_EOS)
    w.add_add_bos_token(True)
    specs = tensor_shapes(shape)
    for name, dims in specs:
        dtype = np.float16 if len(dims) == 2 else np.float32
        w.add_tensor_info(name, dims, np.dtype(dtype), math.prod(dims) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    start = time.perf_counter()
    for i, (name, dims) in enumerate(specs):
        if name == "rope_freqs.weight":
            data = np.array(rope_factors(shape), dtype=np.float32)
        elif len(dims) == 1:
            data = np.ones(dims, dtype=np.float32)
        else:
            g = torch.Generator().manual_seed(zlib.crc32(f"{shape.name}/{name}".encode()))
            data = (torch.randn(dims, generator=g) * STD).to(torch.float16).numpy()
        w.write_tensor_data(data)
        del data
        if i % 20 == 0 or i == len(specs) - 1:
            print(f"  {path.name}: {i + 1}/{len(specs)} tensors, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    w.close()
    tmp.rename(path)


def quantize(src: Path, dst: Path, ftype: str, threads: int) -> None:
    """llama.cpp's quantizer (in this process: run it in a worker, with the llama.cpp build on the path)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    tmp = dst.with_suffix(".part")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"llama_model_quantize({src.name} -> {ftype}) returned {rc}")
    tmp.rename(dst)


def make_files(shape: Shape, ftypes: list[str], args, llama_env: dict) -> dict[str, float]:
    """Make the shape's quantized files where missing (the F16 they come from deleted after); the seconds each step
    took."""
    todo = [t for t in ftypes if not model_path(shape, t).is_file()]
    times: dict[str, float] = {}
    if not todo:
        return times
    MODELS.mkdir(exist_ok=True)
    f16 = model_path(shape, "F16")
    need = sum(math.prod(d) * (2 if len(d) == 2 else 4) for _, d in tensor_shapes(shape))
    free = os.statvfs(MODELS).f_bavail * os.statvfs(MODELS).f_frsize
    if not f16.is_file() and need * 2.2 > free:  # the F16 and the quantized files beside it
        raise SystemExit(f"{shape.label}: the F16 file needs {need / 1e9:.1f} GB and its quantized files about as much;"
                         f" {free / 1e9:.1f} GB free in {MODELS}")
    if not f16.is_file():
        print(f"writing {f16} ({need / 1e9:.1f} GB) ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        write_f16(shape, f16, args.threads)
        times["F16"] = time.perf_counter() - start
    for ftype in todo:
        print(f"quantizing to {model_path(shape, ftype).name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        cmd = [sys.executable, __file__, "--worker", "quantize", "--model", str(f16), "--ftype", ftype,
               "--out", str(model_path(shape, ftype)), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, env=llama_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"quantizing {f16.name} to {ftype} failed: {proc.stderr.strip()[-2000:]}")
        times[ftype] = time.perf_counter() - start
    if all(model_path(shape, t).is_file() for t in ftypes):
        f16.unlink()  # made again (the same weights: seeded by name) if another type is asked for later
    return times


def file_facts(path: Path) -> dict:
    """What the file holds, from its tensor infos (lamina's reader): its size, the bytes a token reads (every layer
    projection and the output projection as stored; the embedding's one row is negligible) and those bytes by type."""
    from lamina.weights.gguf_file import read_gguf_file

    tensors = read_gguf_file(path).tensors
    output = "output.weight" if "output.weight" in tensors else "token_embd.weight"  # tied: the embedding
    read = [t for n, t in tensors.items() if n == output or (n.startswith("blk.") and n.split(".")[2] in PROJECTIONS)]
    by_type: dict[str, int] = {}
    for t in read:
        by_type[t.qtype] = by_type.get(t.qtype, 0) + t.data.nbytes
    return {
        "file_bytes": path.stat().st_size,
        "token_bytes": sum(by_type.values()),
        "by_type": by_type,
        "output_type": tensors[output].qtype,
        "embedding_type": tensors["token_embd.weight"].qtype,
    }


# ---- the workers --------------------------------------------------------------------------------------------------


def vm_hwm_mb() -> float:
    """This process's peak resident set (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def busy_cpu_s() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds this process has used) so far."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    mine = os.times()
    return busy / tick, mine.user + mine.system


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def skip(reason: str):
    print(reason, file=sys.stderr, flush=True)
    sys.exit(SKIPPED)


def watch_memory(engine: str, floor: int = 1 << 30) -> None:
    """Stop this worker (with a message) before the machine runs out of memory: the estimates below are estimates."""

    def watch():
        while True:
            if mem_available() < floor:
                print(f"{engine} stopped: less than {floor >> 30} GiB of memory left available "
                      f"(this worker's RSS peak {vm_hwm_mb():.0f} MB)", file=sys.stderr, flush=True)
                os._exit(SKIPPED)
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()


def lamina_memory(path: str, max_batch: int, max_seq_len: int) -> tuple[int, dict[str, int]]:
    """lamina's memory for a file, estimated before loading: matrices in the block formats its loader keeps at the
    file's size, every other tensor widened to float32, and a float32 KV cache; with the widened bytes by type."""
    from lamina.weights.gguf_file import read_gguf_file

    try:  # the block formats load_gguf keeps as stored (keep=True): its type table, or before that table, ggml's
        from lamina.kernels.types import TYPES as kept
    except ImportError:
        from lamina.quant.ggml import BLOCK_BYTES as kept
    gf = read_gguf_file(path)
    total, widened = 0, {}
    for t in gf.tensors.values():
        if t.qtype in kept and len(t.shape) == 2:
            total += t.data.nbytes
        else:
            total += 4 * math.prod(t.shape)
            if t.qtype != "F32":
                widened[t.qtype] = widened.get(t.qtype, 0) + 4 * math.prod(t.shape)
    m = gf.metadata
    heads, kv, layers = m["llama.attention.head_count"], m["llama.attention.head_count_kv"], m["llama.block_count"]
    total += 2 * layers * kv * (m["llama.embedding_length"] // heads) * 4 * max_batch * max_seq_len
    return total, widened


def engine_args(args) -> SimpleNamespace:
    """The settings bench_generate's engine classes read."""
    return SimpleNamespace(
        model=args.model, dtype=None, quantize=None, compile=False, kernel_path=None, prefill_dtype=None,
        streams=list(STREAMS), prefill=[args.prompt_len], tokens=args.new_tokens, threads=args.threads,
    )


def lamina_engine(args):
    seq = max(args.prompt_len + 8, DECODE_PROMPT + args.new_tokens + 8)  # as LaminaEngine asks for
    need, widened = lamina_memory(args.model, max(STREAMS), seq)
    have = mem_available()
    if need > 0.85 * have:
        what = ", ".join(f"{k} {v / 1e9:.1f} GB" for k, v in widened.items())
        skip(f"lamina refused: it would need ~{need / 1e9:.1f} GB ({what} of it weights widened to float32 at load), "
             f"more than the {have / 1e9:.1f} GB available; it can run this file once its loader keeps these types "
             "as blocks")
    watch_memory("lamina")
    e = LaminaEngine(engine_args(args))
    e.info["estimated_mb"] = need / 1e6
    return e


def llama_cpp_engine(args):
    watch_memory("llama.cpp")
    return LlamaCppEngine(engine_args(args))


class RandomTransformers(TransformersEngine):
    """transformers bfloat16 on a LlamaConfig of the shape, randomly initialised (the GGUF is not read); tokens from
    the tiktoken reference tokenizer that the GGUF's vocabulary was made from."""

    def __init__(self, args):
        import llama_models
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        from lamina.tokenizer.llama3 import Llama3Tokenizer

        s = SHAPES[args.shape]
        kv = s.n_kv_heads * s.head_dim
        params = s.vocab_size * s.dim * (1 if s.tied else 2) + s.n_layers * (
            2 * s.dim * s.dim + 2 * kv * s.dim + 3 * s.dim * s.hidden_dim
        )
        have = mem_available()
        if 2 * params + (2 << 30) > have:
            skip(f"transformers skipped: {params / 1e9:.2f}B parameters in bfloat16 are {2 * params / 1e9:.1f} GB, "
                 f"with 2 GiB of room for the rest more than the {have / 1e9:.1f} GB available")
        watch_memory("transformers")
        config = LlamaConfig(
            vocab_size=s.vocab_size, hidden_size=s.dim, intermediate_size=s.hidden_dim,
            num_hidden_layers=s.n_layers, num_attention_heads=s.n_heads, num_key_value_heads=s.n_kv_heads,
            head_dim=s.head_dim, rms_norm_eps=s.norm_eps, max_position_embeddings=s.context_length,
            tie_word_embeddings=s.tied, bos_token_id=LLAMA_BOS, eos_token_id=LLAMA_EOS,
            rope_theta=s.rope_theta,
            rope_scaling={"rope_type": "llama3", "factor": s.rope_factor, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        )
        self.model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        self.info = {"parameters": params}
        self.tok = Llama3Tokenizer(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model")
        self.tokens = args.new_tokens
        self.torch = torch

    def token_ids(self, text):
        return self.tok.encode(text, bos=False, eos=False)


def worker(args) -> dict:
    """Load one engine in this process, run its measurements and return them."""
    import torch

    torch.set_num_threads(args.threads)
    make = {"lamina": lamina_engine, "llama.cpp": llama_cpp_engine, "transformers": RandomTransformers}[args.worker]
    start = time.perf_counter()
    e = make(args)
    out: dict = {"engine": args.worker, "load_s": time.perf_counter() - start, "rss_load_mb": vm_hwm_mb()}
    out.update(getattr(e, "info", {}))
    ids = e.token_ids(TEXT * max(400, args.prompt_len // 5))
    out["prompt_ids"] = ids[: args.prompt_len]
    busy, mine, wall = *busy_cpu_s(), time.perf_counter()
    runs = [("decode", e.decode, n) for n in STREAMS] + [("prefill", e.prefill, args.prompt_len)]
    if args.worker == "transformers":  # the batched peer: 8 streams only
        runs = [("decode", e.decode, max(STREAMS))]
    for kind, fn, size in runs:
        try:
            if kind == "decode":
                e.tokens = WARMUP_TOKENS
            fn(ids, size)  # warm-up
            e.tokens = args.new_tokens
            out[f"{kind}@{size}"] = [fn(ids, size) for _ in range(args.runs)]
        except NotImplementedError:  # llama.cpp: one stream only
            pass
    out["rss_peak_mb"] = vm_hwm_mb()
    # CPU time other processes took while this one measured: contention that the figures carry.
    busy2, mine2 = busy_cpu_s()
    out["others_cpu"] = max((busy2 - busy) - (mine2 - mine), 0) / (time.perf_counter() - wall)
    return out


def bandwidth(threads: int) -> float:
    """Read bandwidth, bytes/s: torch.sum over 1 GiB of float32 with `threads` threads, best of 5."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(1 << 28, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best


# ---- the driver ---------------------------------------------------------------------------------------------------


def llama_cpp_setup(choice: str | None) -> tuple[dict, str]:
    """The environment a llama.cpp worker runs in (the build on PYTHONPATH) and a note on which build it is."""
    if choice is None:
        probe = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True)
        choice = "installed" if probe.returncode == 0 else "build"
    env = dict(os.environ)
    if choice == "installed":
        probe = subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            raise SystemExit(
                "llama-cpp-python is not installed: pip install -e '.[bench]' (it builds from source), or run with "
                f"--llama-cpp build to build {LLAMA_CPP_VERSION} for this machine into benchmarks/.llama-cpp/ "
                "(~10-20 minutes once), or leave llama.cpp out with --engines lamina,transformers"
            )
        return env, f"llama-cpp-python {probe.stdout.strip()} (installed)"
    variant = "no-amx" if "amx" in cpu_line() else "native"  # its AMX code stops with SIGILL (PERF-NOTES)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(build_llama_cpp(variant)), env.get("PYTHONPATH")]))
    probe = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True, text=True, env=env)
    if probe.returncode != 0:  # built with --no-deps: its own dependencies come from the bench extra
        raise SystemExit(f"the llama-cpp-python built in {env['PYTHONPATH'].split(os.pathsep)[0]} does not import "
                         f"({(probe.stderr.strip().splitlines() or ['?'])[-1]}): pip install -e '.[bench]'")
    return env, f"llama-cpp-python {LLAMA_CPP_VERSION} built here ({variant})"


def run_worker(engine: str, path: Path, shape: Shape, args, env: dict) -> tuple[dict | None, str]:
    """One engine's worker process: (its results, or None and why)."""
    cmd = [sys.executable, __file__, "--worker", engine, "--model", str(path), "--shape", shape.name,
           "--runs", str(args.runs), "--new-tokens", str(args.new_tokens), "--prompt-len", str(args.prompt_len),
           "--threads", str(args.threads)]
    print(f"running {engine} on {path.name if engine != 'transformers' else shape.label} ...", file=sys.stderr,
          flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1]), ""
    last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
    if proc.returncode in (-signal.SIGILL, 128 + signal.SIGILL):
        last = f"illegal instruction (SIGILL){' in its AMX code: try --llama-cpp build' if 'amx' in cpu_line() else ''}"
    elif proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL):
        last = "killed (out of memory?)"
    elif proc.returncode != SKIPPED:
        last = f"failed ({proc.returncode}): {last}"
    print(f"  {last}", file=sys.stderr)
    return None, last


def lamina_tree() -> str:
    """Whether lamina's sources differ from the commit (the figures are the working tree's)."""
    proc = subprocess.run(["git", "status", "--porcelain", "--", "lamina"], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent)
    clean = proc.returncode == 0 and not proc.stdout.strip()
    return "lamina as committed" if clean else "lamina with uncommitted changes"


def median(r: dict | None, key: str) -> float | None:
    return summarize(r[key])[0] if r and key in r else None


def cell(r: dict | None, key: str) -> str:
    return "%.1f (%.1f-%.1f)" % summarize(r[key]) if r and key in r else "-"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(results: dict, facts: dict, bw: float, args, header: str) -> None:
    """The table of every figure, the ratios, and the notes on what did not run."""
    print(header)
    cols = ["file", "engine", "MB read/token", "1-stream bound (tok/s)", "decode, 1 stream (tok/s)", "share of bound",
            "decode, 8 streams (tok/s)", f"prefill, {args.prompt_len} tokens (tok/s)", "RSS after load (MB)",
            "peak RSS (MB)", "others' CPU"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    notes = []
    for (shape, ftype), f in facts.items():
        types = ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in sorted(f["by_type"].items(), key=lambda kv: -kv[1]))
        notes.append(f"{model_path(shape, ftype).name}: {f['file_bytes'] / 1e6:.0f} MB; a token reads "
                     f"{f['token_bytes'] / 1e6:.0f} MB ({types}); output projection {f['output_type']}, embedding "
                     f"{f['embedding_type']}")
    for (shape, ftype), engines in results.items():
        f = facts.get((shape, ftype))
        for engine, (r, why) in engines.items():
            name = f"{shape.name} {ftype}" if ftype != "bf16" else f"{shape.name} bf16 (random init)"
            per_token = f["token_bytes"] if f else None
            bound = bw / per_token if per_token else None
            one = median(r, "decode@1")
            row = [name, engine, f"{per_token / 1e6:.0f}" if per_token else "-",
                   f"{bound:.1f}" if bound and engine != "transformers" else "-", cell(r, "decode@1"),
                   f"{one / bound:.0%}" if one and bound else "-", cell(r, "decode@8"),
                   cell(r, f"prefill@{args.prompt_len}"),
                   f"{r['rss_load_mb']:.0f}" if r else "-", f"{r['rss_peak_mb']:.0f}" if r else "-",
                   f"{r['others_cpu']:.2f}" if r else "-"]
            print("| " + " | ".join(row) + " |")
            if why:
                notes.append(f"{name}, {engine}: {why}")
            if r and r["others_cpu"] > 0.2:
                notes.append(f"{name}, {engine}: other processes used {r['others_cpu']:.2f} of the machine's CPUs "
                             "while it ran: its figures are low by up to that much, or more (run again when idle)")
    print()
    cols = ["file", "lamina / llama.cpp, 1 stream", f"lamina / llama.cpp, prefill {args.prompt_len}",
            "lamina 8 streams / lamina 1 stream", "lamina 8 streams / transformers bf16 8 streams"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for (shape, ftype), engines in results.items():
        if ftype == "bf16":
            continue
        ours, cpp = engines.get("lamina", (None, ""))[0], engines.get("llama.cpp", (None, ""))[0]
        hf = results.get((shape, "bf16"), {}).get("transformers", (None, ""))[0]
        p = f"prefill@{args.prompt_len}"
        print(f"| {shape.name} {ftype} | {ratio(median(ours, 'decode@1'), median(cpp, 'decode@1'))} | "
              f"{ratio(median(ours, p), median(cpp, p))} | "
              f"{ratio(median(ours, 'decode@8'), median(ours, 'decode@1'))} | "
              f"{ratio(median(ours, 'decode@8'), median(hf, 'decode@8'))} |")
    print()
    if "llama.cpp" in args.engines:
        notes.append("llama.cpp has no 8-stream figure: llama-cpp-python serves one sequence at a time")
    for (shape, ftype), engines in results.items():
        got = {e: r["prompt_ids"] for e, (r, _) in engines.items() if r}
        if ftype != "bf16" and (shape, "bf16") in results and results[(shape, "bf16")]["transformers"][0]:
            got["tiktoken"] = results[(shape, "bf16")]["transformers"][0]["prompt_ids"]
        if len(got) > 1:
            same = len({tuple(v) for v in got.values()}) == 1
            notes.append(f"{shape.name} {ftype}: the {args.prompt_len}-token prompt's ids "
                         f"{'agree' if same else 'DIFFER'} between {', '.join(got)}")
        r = engines.get("lamina", (None, ""))[0]
        if r:
            notes.append(f"{shape.name} {ftype}, lamina: kernel path {r.get('kernel_path')}, prefill products "
                         f"{r.get('prefill_dtype')}, load {r['load_s']:.0f} s, memory estimated {r['estimated_mb']:.0f}"
                         f" MB before loading")
    for n in notes:
        print(f"- {n}")


def chart(results: dict, facts: dict, bw: float, args, machine: str) -> None:
    """Per shape: decode tokens/s by file type (engines, streams and the one-stream bound) and prefill tokens/s."""
    shapes = list(dict.fromkeys(s for s, _ in results))
    fig, axes = charts.figure(2 * len(shapes), f"random-weight Llama 3 GGUFs: decode and prefill\n{machine}", 5.5)
    if fig is None:
        return
    for i, shape in enumerate(shapes):
        ftypes = [t for s, t in results if s is shape and t != "bf16"]
        get = lambda t, e: results[(shape, t)].get(e, (None, ""))[0]  # noqa: E731
        hf = results.get((shape, "bf16"), {}).get("transformers", (None, ""))[0]
        decode = {
            "lamina, 1 stream": [median(get(t, "lamina"), "decode@1") for t in ftypes],
            "llama.cpp, 1 stream": [median(get(t, "llama.cpp"), "decode@1") for t in ftypes],
            "bound, 1 stream": [bw / facts[(shape, t)]["token_bytes"] for t in ftypes],
            "lamina, 8 streams": [median(get(t, "lamina"), "decode@8") for t in ftypes],
            "transformers bf16, 8 streams": [median(hf, "decode@8")] * len(ftypes),
        }
        decode = {k: v for k, v in decode.items() if any(x is not None for x in v)}
        charts.bars(axes[2 * i], ftypes, decode, "tokens/s (all streams)", f"{shape.label}: decode (median)")
        p = f"prefill@{args.prompt_len}"
        prefill = {e: [median(get(t, e), p) for t in ftypes] for e in ("lamina", "llama.cpp")}
        prefill = {k: v for k, v in prefill.items() if any(x is not None for x in v)}
        charts.bars(axes[2 * i + 1], ftypes, prefill, "prompt tokens/s",
                    f"{shape.label}: prefill of {args.prompt_len} tokens (median)")
    charts.save(fig, args.chart)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1b,8b", help=f"of {', '.join(SHAPES)} (tiny: for testing this script)")
    parser.add_argument("--types", default=",".join(TYPES), help="llama.cpp file types (LLAMA_FTYPE_MOSTLY_<type>)")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per decode run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=512, help="tokens of the prefill prompt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-cpp", default=None, choices=["installed", "build"],
                        help="llama-cpp-python as installed, or built here (default: installed where it imports)")
    parser.add_argument("--make-only", action="store_true", help="make the files and stop")
    charts.add_option(parser, __file__)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ftype", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "quantize":
        quantize(Path(args.model), Path(args.out), args.ftype, args.threads)
        return 0
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    shapes, ftypes = args.shapes.split(","), args.types.split(",")
    args.engines = [e for e in args.engines.split(",") if e]
    for what, given, known in (("shape", shapes, SHAPES), ("type", ftypes, TYPES), ("engine", args.engines, ENGINES)):
        if unknown := [g for g in given if g not in known]:
            parser.error(f"unknown {what} {', '.join(unknown)}; expected some of {', '.join(known)}")
    if args.new_tokens < 2 or args.runs < 1 or args.prompt_len < 1:
        parser.error("--new-tokens must be at least 2, --runs and --prompt-len at least 1")
    llama_env, llama_note = llama_cpp_setup(args.llama_cpp)  # the quantizer is llama.cpp's too

    facts, made = {}, {}
    for name in shapes:
        shape = SHAPES[name]
        start = time.perf_counter()
        times = make_files(shape, ftypes, args, llama_env)
        if times:
            made[name] = times
            steps = ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
            print(f"{shape.label}: files made in {time.perf_counter() - start:.0f} s ({steps})", file=sys.stderr)
        for t in ftypes:
            facts[(shape, t)] = file_facts(model_path(shape, t))
    if args.make_only:
        for (shape, t), f in facts.items():
            size, read = f["file_bytes"] / 1e6, f["token_bytes"] / 1e6
            print(f"{model_path(shape, t)}: {size:.0f} MB, a token reads {read:.0f} MB")
        return 0

    before = bandwidth(args.threads)
    results: dict = {}
    for name in shapes:
        shape = SHAPES[name]
        for t in ftypes:
            for engine in (e for e in args.engines if e != "transformers"):
                env = llama_env if engine == "llama.cpp" else os.environ
                results.setdefault((shape, t), {})[engine] = run_worker(engine, model_path(shape, t), shape, args, env)
        if "transformers" in args.engines:
            results[(shape, "bf16")] = {"transformers": run_worker("transformers", Path("-"), shape, args, os.environ)}
    after = bandwidth(args.threads)  # again: a machine shared with other work reads slower at times
    bw = max(before, after)
    machine = machine_line(args.threads)
    header = (
        f"# {machine}, {lamina_tree()}, {llama_note}, read bandwidth {before / 1e9:.1f} GB/s before the engines and "
        f"{after / 1e9:.1f} after (torch.sum over 1 GiB of float32, best of 5; bounds from the higher), decode: "
        f"{args.new_tokens} new tokens after a {DECODE_PROMPT}-token prompt, median (min-max) of {args.runs} runs"
    )
    report(results, facts, bw, args, header)
    for name, times in made.items():
        print(f"- {SHAPES[name].label}: made this run, " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    if args.chart != "none" and results:
        chart(results, facts, bw, args, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
