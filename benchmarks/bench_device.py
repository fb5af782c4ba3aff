"""Decode speed on an accelerator: lamina against transformers on a random Llama-3-8B-shaped checkpoint (bf16), same
device, same run, with the weights' bytes streamed per second set against the device's own copy bandwidth.

    python benchmarks/bench_device.py --device cuda [--preset llama3-8b] [--streams 1,16] [--compile]

No checkpoint is read: both engines get random bf16 weights of the preset's shapes, made on the device (the speed of a
dense model does not depend on its values). Measured: decode tokens/s for each stream count (aggregate, median with
min-max of --runs), the weight bytes a step reads times the steps per second (GB/s), and that as a fraction of a
device-to-device copy's bandwidth measured in the same run (the practical bound for one stream). `--device cpu` with
`--layers 2` runs the same measurement on a small slice of the model, to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time
from datetime import date

import torch


class _IdTokenizer:
    """Token ids in, nothing out: the benchmark feeds ids and never reads text."""

    bos_id = eos_id = None
    add_bos = False
    stop_tokens: list[int] = []
    special_tokens: dict[str, int] = {}

    def __init__(self, n_words: int):
        self.n_words = n_words

    def encode(self, s, *, bos, eos, allowed_special=None):
        raise NotImplementedError("the device benchmark works on token ids")

    def decode(self, ids):
        return ""


def random_state(config, device, dtype, seed=0) -> dict[str, torch.Tensor]:
    """Random weights in lamina's names and shapes, made on the device (std 0.02; norms 1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    H, KVH, D = config.n_heads, config.n_kv_heads, config.head_dim

    def w(*shape):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)

    state = {
        "tok_embeddings.weight": w(config.vocab_size, config.dim),
        "output.weight": w(config.vocab_size, config.dim),
    }
    state["norm.weight"] = torch.ones(config.dim, device=device, dtype=dtype)
    for i in range(config.n_layers):
        p = f"layers.{i}."
        state |= {
            p + "attention.wq.weight": w(H * D, config.dim),
            p + "attention.wk.weight": w(KVH * D, config.dim),
            p + "attention.wv.weight": w(KVH * D, config.dim),
            p + "attention.wo.weight": w(config.dim, H * D),
            p + "feed_forward.w1.weight": w(config.hidden_dim, config.dim),
            p + "feed_forward.w2.weight": w(config.dim, config.hidden_dim),
            p + "feed_forward.w3.weight": w(config.hidden_dim, config.dim),
            p + "attention_norm.weight": torch.ones(config.dim, device=device, dtype=dtype),
            p + "ffn_norm.weight": torch.ones(config.dim, device=device, dtype=dtype),
        }
    return state


def step_bytes(config, dtype) -> int:
    """Weight bytes one decode step reads: every matrix but the embedding table (a step looks up a row of it; a tied
    output projection reads the table once, as an untied one reads its own)."""
    per_layer = config.dim * config.head_dim * (2 * config.n_heads + 2 * config.n_kv_heads)
    per_layer += 3 * config.dim * config.hidden_dim
    n = config.n_layers * per_layer + config.vocab_size * config.dim
    return n * torch.empty((), dtype=dtype).element_size()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device, nbytes=1 << 30) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written), best of 5."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best / 1e9


def bench_lamina(config, args, device, dtype, prompts) -> dict[int, list[float]]:
    from lamina import Llama
    from lamina.engine.config import EngineConfig
    from lamina.model import build_transformer

    model = build_transformer(config, random_state(config, device, dtype), device=device, dtype=dtype)
    engine = EngineConfig(args.prompt + args.tokens + 8, max(args.streams), device, dtype, compile=args.compile)
    llama = Llama(model, _IdTokenizer(config.vocab_size), engine)
    out = {}
    for streams in args.streams:
        batch = prompts[:streams]

        def run():
            first = None
            for _ in llama.stream(batch, args.tokens, temperature=0, ignore_eos=True):
                if first is None:
                    sync(device)
                    first = time.perf_counter()
            sync(device)
            return streams * (args.tokens - 1) / (time.perf_counter() - first)

        start = time.perf_counter()
        run()  # warm-up (and compile)
        print(f"  lamina, {streams} stream(s): first run {time.perf_counter() - start:.1f} s", file=sys.stderr)
        out[streams] = [run() for _ in range(args.runs)]
    return out


def bench_transformers(config, args, device, dtype, prompts) -> dict[int, list[float]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        hidden_size=config.dim,
        intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        vocab_size=config.vocab_size,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.norm_eps,
        max_position_embeddings=args.prompt + args.tokens + 8,
        tie_word_embeddings=config.tie_embeddings,
    )
    with torch.device(device):
        model = LlamaForCausalLM._from_config(hf_config, dtype=dtype).eval()
    out = {}
    for streams in args.streams:
        batch = torch.tensor(prompts[:streams], device=device)
        kwargs = dict(do_sample=False, pad_token_id=0)

        def run():
            with torch.inference_mode():
                sync(device)
                start = time.perf_counter()
                model.generate(batch, max_new_tokens=1, min_new_tokens=1, **kwargs)
                sync(device)
                first = time.perf_counter() - start
                start = time.perf_counter()
                model.generate(batch, max_new_tokens=args.tokens, min_new_tokens=args.tokens, **kwargs)
                sync(device)
                total = time.perf_counter() - start
            return streams * (args.tokens - 1) / (total - first)

        run()
        out[streams] = [run() for _ in range(args.runs)]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="llama3-8b", help="model shapes, a lamina preset name")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the preset (a quick check)")
    parser.add_argument("--streams", default="1,16")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per decode run")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per stream")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="compile lamina's decode step")
    parser.add_argument("--engines", default="lamina,transformers")
    args = parser.parse_args()
    args.streams = [int(s) for s in args.streams.split(",")]

    from lamina.engine.config import resolve_device
    from lamina.model import ModelConfig

    device, dtype = resolve_device(args.device), torch.bfloat16
    config = ModelConfig.preset(args.preset)
    if args.layers:
        config = dataclasses.replace(config, n_layers=args.layers)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, config.vocab_size, (max(args.streams), args.prompt), generator=g).tolist()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    bandwidth = copy_bandwidth(device)
    nbytes = step_bytes(config, dtype)

    results = {}
    for engine in args.engines.split(","):
        print(f"running {engine} ...", file=sys.stderr, flush=True)
        bench = {"lamina": bench_lamina, "transformers": bench_transformers}[engine]
        try:
            results[engine] = bench(config, args, device, dtype, prompts)
        except ImportError as e:
            print(f"  {engine} skipped: {e}", file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    layers = f", {config.n_layers} layers" if args.layers else ""
    print(
        f"# {name}, {date.today()}, random {args.preset}{layers} bf16 ({nbytes / 1e9:.2f} GB read a step), "
        f"{args.prompt}-token prompts, {args.tokens} new tokens, device copy bandwidth {bandwidth:.0f} GB/s, "
        f"lamina{' compiled' if args.compile else ' eager'}, median (min-max) of {args.runs} runs"
    )
    peers = [e for e in results if e != "lamina"]
    header = ["streams"] + [f"{e} tok/s" for e in results] + ["lamina GB/s", "of copy bandwidth"]
    header += [f"lamina / {p}" for p in peers]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for streams in args.streams:
        row = [str(streams)]
        for e in results:
            v = results[e][streams]
            row.append(f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})")
        if "lamina" in results:
            steps = statistics.median(results["lamina"][streams]) / streams
            row += [f"{steps * nbytes / 1e9:.0f}", f"{steps * nbytes / 1e9 / bandwidth:.0%}"]
            row += [
                f"{statistics.median(results['lamina'][streams]) / statistics.median(results[p][streams]):.2f}x"
                for p in peers
            ]
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
