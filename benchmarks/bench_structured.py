"""Structured output's cost: decode tokens/s and time to first token with and without a JSON-schema constraint, at
1 and 16 streams, lamina against llama.cpp (llama-cpp-python, its grammar from the same schema) on the same GGUF,
same machine, same run.

    python benchmarks/bench_structured.py [--model FILE.gguf] [--tokens 128] [--runs 3] [--engines lamina,llama.cpp]
                                          [--overlap]

Each engine runs in its own subprocess. Every stream asks for a long JSON document (a list of ten people) and is
greedy for `--tokens` new tokens, so that constrained and free streams make as many tokens. Measured per engine,
free and constrained: time to first token of one stream (the schema already compiled once: a schema seen before),
the first token of a schema never seen (the compile included), decode tokens/s of one stream and of 16 (lamina only:
llama-cpp-python runs one at a time), counted from when every stream has its first token; free and constrained runs
alternate. `--overlap`: lamina fills the masks on a worker thread during the forward pass (its default on an
accelerator; on the CPU it fills them after). Ratios: constrained over free (the cost: 1.00 is free), and lamina's constrained tokens/s over
llama.cpp's.
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

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "email": {"type": "string", "format": "email"},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "city", "email", "hobbies"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "items": PERSON, "minItems": 10, "maxItems": 10}},
    "required": ["people"],
}
QUESTION = "List ten fictional people as JSON, each with name, age, city, email and hobbies."


def _fresh_schema(i: int) -> dict:
    """A schema no one has compiled yet (another bound), for the cold first token."""
    return {**SCHEMA, "properties": {"people": {**SCHEMA["properties"]["people"], "description": f"run {i}"}}}


def lamina_worker(args) -> dict:
    import torch

    import lamina

    torch.set_num_threads(args.threads)
    llama = lamina.load(args.model, max_batch_size=16, max_seq_len=1024, prefix_caching=False)
    llama.core.sampler.overlap = args.overlap  # masks filled during the forward pass (the accelerator's default)
    prompt = llama.encode_dialog([{"role": "user", "content": QUESTION}])

    def run(streams: int, schema: dict | None) -> tuple[float, float]:
        spec = None if schema is None else {"json": schema}
        start, first, started, all_started, made = time.perf_counter(), None, set(), None, 0
        for d in llama.stream([prompt] * streams, args.tokens, temperature=0, ignore_eos=True, structured_outputs=spec):
            now = time.perf_counter()
            first = first or now
            if all_started is not None:
                made += d.token is not None
            else:
                started.add(d.index)
                if len(started) == streams:
                    all_started = now
        return first - start, made / (time.perf_counter() - all_started)

    return _alternating(lambda schema: run(1, schema), lambda schema: run(16, schema)[1], args.runs) | {
        "json.ttft_cold": statistics.median(run(1, _fresh_schema(i))[0] for i in range(args.runs))
    }


def _alternating(one, many, runs: int) -> dict:
    """Medians of free and constrained runs taken in turns (free, constrained, free, ...), so that a machine whose
    speed drifts over minutes weighs on both alike. `one(schema)` -> (ttft, tok/s) of a stream; `many(schema)` ->
    tok/s of 16 streams (None for an engine without)."""
    one(None), one(SCHEMA)  # warm-up, and the schema's one compile
    results: dict[str, list] = {}
    for _ in range(runs):
        for label, schema in (("free", None), ("json", SCHEMA)):
            ttft, tps = one(schema)
            results.setdefault(f"{label}.ttft", []).append(ttft)
            results.setdefault(f"{label}.tps@1", []).append(tps)
    for _ in range(runs if many is not None else 0):
        for label, schema in (("free", None), ("json", SCHEMA)):
            results.setdefault(f"{label}.tps@16", []).append(many(schema))
    return {key: statistics.median(values) for key, values in results.items()}


def llama_cpp_worker(args) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(args.model, n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    messages = [{"role": "user", "content": QUESTION}]

    def run(schema: dict | None, grammar=None) -> tuple[float, float]:
        llm.reset()
        start, first, n = time.perf_counter(), None, 0
        for _ in llm.create_chat_completion(
            messages, max_tokens=args.tokens, temperature=0, stream=True, grammar=grammar
        ):
            first = first or time.perf_counter()
            n += 1
        return first - start, (n - 1) / (time.perf_counter() - first)

    grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False)
    out = _alternating(lambda schema: run(None, grammar if schema else None), None, args.runs)

    def cold(i: int) -> float:
        start = time.perf_counter()
        fresh = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(_fresh_schema(i)), verbose=False)
        return time.perf_counter() - start + run(None, fresh)[0]

    out["json.ttft_cold"] = statistics.median(cold(i) for i in range(args.runs))
    return out


def run_engine(engine: str, args) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", engine, "--model", args.model, "--tokens", str(args.tokens)]
    cmd += ["--runs", str(args.runs), "--threads", str(args.threads)] + (["--overlap"] if args.overlap else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{engine} failed: {proc.stderr.strip()[-1500:]}", file=sys.stderr)
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{engine}: {json.dumps(result)}", file=sys.stderr)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--engines", default="lamina,llama.cpp")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--overlap", action="store_true", help="lamina fills masks during the forward pass")
    charts.add_option(parser, __file__)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from lamina.loader import default_model_path

        args.model = str(default_model_path())
    if args.worker:
        print(json.dumps((lamina_worker if args.worker == "lamina" else llama_cpp_worker)(args)))
        return 0
    results = {e: run_engine(e, args) for e in args.engines.split(",")}
    machine = machine_line(args.threads)
    print(
        f"# {machine}, model {os.path.basename(args.model)}, greedy, {args.tokens} new tokens, median of {args.runs}, "
        f"Python {platform.python_version()}"
    )
    print("| engine | figure | free | JSON schema | schema / free |")
    print("|---|---|---|---|---|")
    rows = [("ttft", "time to first token (ms)", 1000), ("tps@1", "decode tok/s, 1 stream", 1)]
    rows += [("tps@16", "decode tok/s, 16 streams", 1)]
    for engine, r in results.items():
        if r is None:
            print(f"| {engine} | failed | | | |")
            continue
        for key, label, scale in rows:
            if f"free.{key}" in r:
                free, json_ = r[f"free.{key}"] * scale, r[f"json.{key}"] * scale
                print(f"| {engine} | {label} | {free:.1f} | {json_:.1f} | {json_ / free:.2f} |")
        print(f"| {engine} | first token, schema never seen (ms) | | {r['json.ttft_cold'] * 1000:.1f} | |")
    ours, theirs = results.get("lamina"), results.get("llama.cpp")
    if ours and theirs:
        ratio = ours["json.tps@1"] / theirs["json.tps@1"]
        print(f"\nlamina / llama.cpp, constrained decode tok/s, 1 stream: {ratio:.2f}x")
    if args.chart != "none":
        chart(results, f"{os.path.basename(args.model)}: a JSON-schema constraint's cost\n{machine}", args.chart)
    return 0


def chart(results: dict, title: str, path: str) -> None:
    """Decode tokens/s free and constrained, and time to first token, for each engine."""
    fig, (speed, first) = charts.figure(2, title)
    if fig is None:
        return
    done = {e: r for e, r in results.items() if r}
    groups = [e for e in done]
    charts.bars(
        speed,
        ["1 stream", "16 streams"],
        {
            f"{e}, {kind}": [done[e].get(f"{kind}.tps@{n}") for n in (1, 16)]
            for e in groups
            for kind in ("free", "json")
        },
        "tokens/s",
        "decode, free vs JSON schema (median)",
    )
    charts.bars(
        first,
        ["free", "JSON schema", "schema never seen"],
        {
            e: [1000 * done[e]["free.ttft"], 1000 * done[e]["json.ttft"], 1000 * done[e]["json.ttft_cold"]]
            for e in groups
        },
        "ms",
        "time to first token (median)",
    )
    charts.save(fig, path)


if __name__ == "__main__":
    sys.exit(main())
