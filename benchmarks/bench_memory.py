"""Memory of a model larger than the default one: lamina against llama.cpp (llama-cpp-python) on a random Llama GGUF
with a published model's shapes (Q4_1 layers, a tied Q8_0 embedding, SmolLM2's tokenizer), same machine, same run.

    python benchmarks/bench_memory.py [--preset llama3.2-1b] [--layers 16] [--tokens 256] [--keep FILE.gguf]

For each engine, in its own process: RSS once its libraries are imported (the runtime: Python, PyTorch or llama.cpp),
then load the file, prefill a 128-token prompt and decode --tokens tokens greedily, then peak RSS. The figure of merit
is the peak above the runtime against the weights (the file's tensor bytes) plus the KV cache in use (lamina float32,
llama.cpp float16, for the tokens of the run), as a ratio; the performance issue asks lamina for at most 1.3x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

PROMPT = 128


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_gguf(path: Path, preset: str, layers: int | None) -> None:
    """A random GGUF of the preset's shapes (vocabulary and tokenizer: the default model's), tied embeddings."""
    import gguf
    import numpy as np
    import torch

    from lamina.loader import default_model_path
    from lamina.model import ModelConfig
    from lamina.quant import ggml
    from lamina.weights.gguf_file import read_gguf_file

    c = ModelConfig.preset(preset)
    n_layers = layers or c.n_layers
    source = read_gguf_file(default_model_path()).metadata
    vocab = len(source["tokenizer.ggml.tokens"])
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(n_layers)
    writer.add_context_length(8192)
    writer.add_embedding_length(c.dim)
    writer.add_feed_forward_length(c.hidden_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(vocab)
    for key, value in source.items():
        if key.startswith("tokenizer."):
            if isinstance(value, list):
                writer.add_array(key, value)
            elif isinstance(value, bool):
                writer.add_bool(key, value)
            elif isinstance(value, int):
                writer.add_uint32(key, value)
            else:
                writer.add_string(key, value)
    g = torch.Generator().manual_seed(0)
    H, KVH, D = c.n_heads, c.n_kv_heads, c.head_dim

    def matrix(name, rows, cols, qtype):
        blocks = ggml.QUANTIZE[qtype](torch.randn(rows, cols, generator=g) * 0.02)
        writer.add_tensor(name, blocks.numpy(), raw_dtype=gguf.GGMLQuantizationType[qtype])

    matrix("token_embd.weight", vocab, c.dim, "Q8_0")
    writer.add_tensor("output_norm.weight", np.ones(c.dim, dtype=np.float32))
    for i in range(n_layers):
        for name, rows, cols in [
            ("attn_q", H * D, c.dim),
            ("attn_k", KVH * D, c.dim),
            ("attn_v", KVH * D, c.dim),
            ("attn_output", c.dim, H * D),
            ("ffn_gate", c.hidden_dim, c.dim),
            ("ffn_up", c.hidden_dim, c.dim),
            ("ffn_down", c.dim, c.hidden_dim),
        ]:
            matrix(f"blk.{i}.{name}.weight", rows, cols, "Q4_1")
        for name in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{name}.weight", np.ones(c.dim, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def worker(engine: str, path: str, tokens: int) -> dict:
    prompt = list(range(1000, 1000 + PROMPT))
    if engine == "lamina":
        import torch  # noqa: F401  (the runtime, before the model)

        import lamina

        before = rss_mb()
        llama = lamina.load(path, max_batch_size=1, max_seq_len=PROMPT + tokens + 8)
        start = time.perf_counter()
        llama.generate([prompt], tokens, temperature=0)
        elapsed = time.perf_counter() - start
        from lamina.engine.kv_cache import KVCache

        kv = (PROMPT + tokens) * KVCache.bytes_per_token(llama.model.config, llama.config.dtype)
    else:
        from llama_cpp import Llama

        before = rss_mb()
        llm = Llama(path, n_ctx=PROMPT + tokens + 8, n_threads=2, n_threads_batch=2, n_batch=512, verbose=False)
        start = time.perf_counter()
        llm.eval(prompt)
        for _ in range(tokens):
            llm.eval([llm.sample(temp=0.0)])
        elapsed = time.perf_counter() - start
        meta = llm.metadata
        n_layers, kvh = int(meta["llama.block_count"]), int(meta["llama.attention.head_count_kv"])
        d = int(meta["llama.embedding_length"]) // int(meta["llama.attention.head_count"])
        kv = (PROMPT + tokens) * n_layers * 2 * kvh * d * 2  # float16 keys and values
    return {"before": before, "peak": peak_mb(), "kv": kv / 1e6, "seconds": elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3.2-1b")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the preset")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--engines", default="lamina,llama.cpp")
    parser.add_argument("--keep", type=Path, default=None, help="write the GGUF here and keep it (reused if present)")
    parser.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.tokens)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "random.gguf"
        if not path.is_file():
            print(f"writing {path} ...", file=sys.stderr, flush=True)
            write_gguf(path, args.preset, args.layers)
        from lamina.weights.gguf_file import read_gguf_file

        weights = sum(t.data.nbytes for t in read_gguf_file(path).tensors.values()) / 1e6
        results = {}
        for engine in args.engines.split(","):
            print(f"running {engine} ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--worker", engine, str(path)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"  {engine} skipped: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}", file=sys.stderr)
                continue
            results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])

    layers = f", {args.layers} layers" if args.layers else ""
    print(
        f"# {platform.machine()}, {date.today()}, random {args.preset}{layers} GGUF (Q4_1 layers, tied Q8_0 "
        f"embedding, {weights:.0f} MB of tensors), {PROMPT}-token prompt + {args.tokens} greedy tokens, one stream"
    )
    print(
        "| engine | RSS before loading (MB) | peak RSS (MB) | above the runtime (MB) | weights + KV in use (MB) "
        "| ratio | run (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for engine, r in results.items():
        above, need = r["peak"] - r["before"], weights + r["kv"]
        print(
            f"| {engine} | {r['before']:.0f} | {r['peak']:.0f} | {above:.0f} | {need:.0f} | {above / need:.2f}x "
            f"| {r['seconds']:.1f} |"
        )
    if "lamina" in results and "llama.cpp" in results:
        ours = results["lamina"]["peak"] - results["lamina"]["before"]
        theirs = results["llama.cpp"]["peak"] - results["llama.cpp"]["before"]
        print(f"lamina / llama.cpp, memory above the runtime: {ours / theirs:.2f}x (lower is better)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
