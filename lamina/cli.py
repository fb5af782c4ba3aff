"""The `lamina` command: generate, chat, serve, info. The only module that reads argv and the environment."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

from lamina.errors import LaminaError
from lamina.quant import FORMAT_MODES, MODES as QUANT_MODES


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        default=None,
        help="a .gguf file, a Hugging Face or Meta checkpoint directory (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16, float16 (default: bf16 on CUDA and on CPUs with native bf16, else fp32)",
    )
    p.add_argument(
        "--max-seq-len",
        type=_checked(int, lambda v: v > 0, "an integer > 0"),
        default=None,
        help="context to allocate (default: the model's, <= 4096)",
    )
    p.add_argument(
        "--threads",
        type=_checked(int, lambda v: v > 0, "an integer > 0"),
        default=None,
        help="CPU threads (default: the cores this process may run on)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode step with torch.compile: minutes of compiling first, faster decode after",
    )
    p.add_argument(
        "--kernel-path",
        choices=["portable", "avx2", "avx512"],
        default=None,
        help="force the CPU kernel path for GGML-block weights (default: the best this CPU runs)",
    )
    p.add_argument(
        "--prefill-dtype",
        choices=["int16", "float32", "bfloat16"],
        default=None,
        help="the arithmetic of prompt processing with GGML-block weights on the CPU: int16 (lamina's kernels over "
        "the blocks; the default on AVX-512, ~2x float32), float32 (exact float32 log-probabilities; the default "
        "elsewhere) or bfloat16 (~2x float32 on CPUs with AVX-512 BF16 or AMX)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "f32", "f16", "bf16", "q8_0"],
        default=None,
        help="what the KV cache holds: auto (the model's dtype), f32, f16, bf16, or q8_0 (8-bit, a scale per 32)",
    )
    p.add_argument(
        "--speculative-config",
        type=_speculative_config,
        default=None,
        metavar="JSON",
        help='speculative decoding, as vLLM\'s: \'{"method": "ngram", "num_speculative_tokens": 8, '
        '"prompt_lookup_max": 3, "prompt_lookup_min": 1}\' (prompt lookup) or \'{"model": PATH, '
        '"num_speculative_tokens": 4}\' (a draft model sharing the tokenizer)',
    )
    p.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="compute every prompt in full (default: reuse the cached KV blocks that begin a prompt)",
    )
    p.add_argument(
        "--quantize",
        choices=QUANT_MODES,
        default=None,
        metavar="MODE",
        help="weight storage: none (all float), gguf (a GGUF's matrices as stored), int8 (Q8_0 blocks), int4 (Q4_1 "
        f"blocks), or one GGML format for every matrix ({', '.join(FORMAT_MODES)}; llama.cpp's fallback where a row "
        "is not whole blocks); default: gguf for a GGUF on CPU, else none",
    )


def _size(text: str) -> int:
    """Bytes from "123", "512K", "512M", "2G" (powers of 1024; a trailing B or iB is allowed)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in "KMGT" else ""
    return int(float(t.removesuffix(unit) if unit else t) * units[unit])


def _speculative_config(text: str):
    """--speculative-config's JSON, checked before the model is loaded."""
    from lamina.engine.speculative import SpeculativeConfig
    from lamina.errors import ConfigError

    try:
        return SpeculativeConfig.parse(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _checked(convert, ok, what: str):
    """An argparse type that converts and checks a value, so bad flags fail before the model is loaded."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: expected {what}")
        return value

    return parse


def _sampling_options(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument(
        "--max-tokens",
        "-n",
        type=_checked(int, lambda v: v >= 0, "an integer >= 0"),
        default=max_tokens,
        help=f"new tokens at most (default {max_tokens})",
    )
    p.add_argument(
        "--temperature",
        "-t",
        type=_checked(float, lambda v: 0 <= v < float("inf"), "a number >= 0"),
        default=0.6,
        help="0 is greedy (default 0.6)",
    )
    p.add_argument(
        "--top-p",
        type=_checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
        default=0.9,
        help="nucleus sampling mass (default 0.9)",
    )
    p.add_argument(
        "--seed",
        type=_checked(int, lambda v: -(2**63) <= v < 2**64, "a 64-bit integer"),
        default=None,
        help="random seed for reproducible sampling",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lamina", description="Llama-family text generation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,chat,serve,info}")

    gen = sub.add_parser("generate", help="continue a prompt, streaming the text to stdout")
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read from stdin)")
    _model_options(gen)
    _sampling_options(gen, max_tokens=128)
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")

    chat = sub.add_parser("chat", help="an interactive multi-turn chat in the terminal")
    _model_options(chat)
    _sampling_options(chat, max_tokens=512)
    chat.add_argument("--system", default=None, help="a system message to start the conversation with")

    serve = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    _model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_checked(int, lambda v: 0 <= v < 65536, "a port number"), default=8000)
    serve.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/ routes")
    serve.add_argument(
        "--max-batch-size",
        type=_checked(int, lambda v: v > 0, "an integer > 0"),
        default=16,
        help="requests decoding at once (default 16)",
    )
    serve.add_argument(
        "--max-queue",
        type=_checked(int, lambda v: v >= 0, "an integer >= 0"),
        default=256,
        help="requests waiting beyond the batch before new ones get 429 (default 256)",
    )
    serve.add_argument(
        "--drain-timeout",
        type=_checked(float, lambda v: v >= 0, "a number of seconds >= 0"),
        default=30.0,
        help="on SIGTERM or Ctrl-C, seconds the requests in flight get to finish while new ones get 503; then the "
        "rest are aborted and the server exits 0 (default 30; a second signal stops at once)",
    )
    serve.add_argument(
        "--kv-cache-memory",
        type=_checked(_size, lambda v: v > 0, "a size such as 512M or 2G"),
        default=None,
        help="memory for the paged KV cache (default: room for --max-batch-size sequences of --max-seq-len)",
    )
    serve.add_argument(
        "--block-size",
        type=_checked(int, lambda v: v > 0, "an integer > 0"),
        default=16,
        help="positions per KV-cache block (default 16)",
    )
    serve.add_argument("--served-model-name", default=None, help="the model id clients name (default: the file's)")
    serve.add_argument("--no-ui", action="store_true", help="do not serve the chat page at / (the API only)")
    serve.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="info (default): startup lines and one line per request; warning: problems only; debug: also /health "
        "and /metrics requests, and the HTTP server's own lines",
    )
    serve.add_argument(
        "--tensor-parallel-size",
        type=_checked(int, lambda v: v > 0, "an integer > 0"),
        default=None,
        help="split the model across N processes started here (torch.distributed's launcher on this host; under "
        "torchrun the launch decides)",
    )
    serve.add_argument(
        "--distributed-timeout",
        type=_checked(float, lambda v: v > 0, "seconds > 0"),
        default=300.0,
        help="across processes: how long a rank may wait on the others before the server stops (default 300 s)",
    )
    info = sub.add_parser("info", help="describe a model")
    _model_options(info)
    return parser


def _rank() -> int:
    """This process's rank in a torchrun launch (0 outside one). Only rank 0 writes the command's output."""
    return int(os.environ.get("RANK", "0") or 0)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if _rank() > 0:  # every rank runs the same command; rank 0 alone answers on stdout
        sys.stdout = open(os.devnull, "w")
    try:
        return {"generate": _generate, "chat": _chat, "serve": _serve, "info": _info}[args.command](args)
    except LaminaError as e:
        where = f"[rank {_rank()}] " if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1" else ""
        print(f"lamina: error: {where}{e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. piped into `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _load(args, show_progress: bool):
    import torch

    import lamina

    # The process's thread count is the command's to set, not the library's: under torchrun each rank takes its
    # share of the cores this machine's ranks may run on.
    ranks_here = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    torch.set_num_threads(args.threads or max(len(os.sched_getaffinity(0)) // ranks_here, 1))
    progress = _ProgressBar("loading") if show_progress and sys.stderr.isatty() else None
    try:
        return lamina.load(
            args.model,
            device=args.device,
            dtype=args.dtype,
            max_seq_len=args.max_seq_len,
            max_batch_size=getattr(args, "max_batch_size", 1),
            kv_cache_memory=getattr(args, "kv_cache_memory", None),
            block_size=getattr(args, "block_size", 16),
            quantize=args.quantize,
            compile=args.compile,
            kernel_path=args.kernel_path,
            prefill_dtype=args.prefill_dtype,
            prefix_caching=args.prefix_caching,
            kv_cache_dtype=args.kv_cache_dtype,
            speculative_config=args.speculative_config,
            progress=progress,
        )
    finally:
        if progress:
            progress.close()


def _generate(args) -> int:
    prompt = args.prompt
    if prompt is None and sys.stdin is not None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if not prompt or not prompt.strip():
        given = " (the one given is empty or only whitespace)" if prompt else ""
        raise LaminaError(f"no prompt: give one as an argument or pipe it on stdin{given}")
    llama = _load(args, show_progress=not args.json)
    if args.chat:
        prompt_ids = llama.encode_dialog([{"role": "user", "content": prompt}])
    else:
        prompt_ids = llama.tokenizer.encode(prompt, bos=llama.tokenizer.add_bos, eos=False)
    sampling = dict(max_gen_len=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
    if args.json:
        (result,) = llama.complete([prompt_ids], **sampling, logprobs=True, seed=args.seed)
        print(
            json.dumps(
                {
                    "prompt_ids": result.prompt,
                    "ids": result.tokens,
                    "text": llama.tokenizer.decode(result.tokens),
                    "logprobs": result.logprobs,
                    "finish_reason": result.finish_reason,
                },
                ensure_ascii=False,
            )
        )
        return 0
    for delta in llama.stream([prompt_ids], **sampling, seed=args.seed):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _chat(args) -> int:
    llama = _load(args, show_progress=True)
    if llama.formatter is None:
        raise LaminaError("this model has no chat template; use `lamina generate` instead")
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty() and _rank() == 0
    seed = args.seed
    while True:
        line = _read_line("> " if interactive else "")
        if line is None:
            if interactive:
                print()
            return 0
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        prompt_ids = _fit_history(llama, history)
        if prompt_ids is None:
            history.pop()
            print("lamina: that message does not fit in the context; try a shorter one", file=sys.stderr)
            continue
        budget = min(args.max_tokens, llama.config.max_seq_len - len(prompt_ids))
        reply = []
        try:
            for delta in llama.stream([prompt_ids], budget, args.temperature, args.top_p, seed=seed):
                reply.append(delta.text)
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass  # stop this reply, keep what was said, go on with the conversation
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
        seed = None if seed is None else seed + 1


def _read_line(prompt: str) -> str | None:
    """The user's next line (None at the end of input). Under torchrun rank 0 reads it and every rank gets it, so all
    ranks run the same turn."""
    import torch.distributed as dist

    line = None
    if _rank() == 0:
        try:
            line = input(prompt)
        except (EOFError, KeyboardInterrupt):
            line = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [line]
        dist.broadcast_object_list(box, src=0)
        line = box[0]
    return line


def _fit_history(llama, history: list[dict]) -> list[int] | None:
    """Encode the conversation, dropping the oldest exchanges (never the system message) until it leaves room to
    answer. Returns None when even the last message alone does not fit."""
    room = max(16, llama.config.max_seq_len // 8)
    while True:
        ids = llama.encode_dialog(history)
        if len(ids) + room <= llama.config.max_seq_len:
            return ids
        first = 1 if history[0]["role"] == "system" else 0
        if len(history) - first <= 1:
            return None
        del history[first : first + 2]


def _serve(args) -> int:
    from lamina import parallel
    from lamina.parallel import launched_ranks

    tp_size = args.tensor_parallel_size
    if tp_size is not None and launched_ranks() > 1 and tp_size != launched_ranks():
        raise LaminaError(f"--tensor-parallel-size {tp_size} under a launch of {launched_ranks()} processes")
    followers = _spawn_followers(tp_size, args.argv) if tp_size and tp_size > 1 and launched_ranks() == 1 else None
    try:
        if launched_ranks() > 1:  # join the group first, with the server's timeout
            from lamina.engine.config import resolve_device

            parallel.init(launched_ranks(), resolve_device(args.device), timeout_s=args.distributed_timeout)
        _setup_logging(args.log_level)
        llama = _load(args, show_progress=True)
        tp = parallel.current()
        if tp is not None and tp.rank > 0:  # a following rank: run rank 0's forward passes until it stops
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle; it stops this rank
            try:
                parallel.follow(llama.runner, tp)
            except RuntimeError as e:  # rank 0 gone, or a collective timed out
                raise LaminaError(f"lost the tensor-parallel group: {str(e).splitlines()[0][:300]}") from None
            return 0
        return _serve_rank0(args, llama, tp, followers)
    finally:
        if followers is not None:
            _reap(followers)


def _serve_rank0(args, llama, tp, followers) -> int:
    import uvicorn

    from lamina import parallel
    from lamina.loader import default_model_path
    from lamina.serve.app import create_app

    if tp is not None:
        parallel.drive(llama.runner, tp)
    path = Path(args.model or default_model_path())
    name = args.served_model_name or path.name
    app = create_app(llama, model_name=name, api_key=args.api_key, max_queue=args.max_queue, ui=not args.no_ui)
    failed: list[str] = []
    if tp is not None:  # a rank gone: its requests were failed (5xx); say which, and stop

        def stop(error: Exception) -> None:
            if failed:  # once is enough: a second SIGTERM, once uvicorn has let go of it, would end this process
                return  # before it reaps the other ranks
            app.state.engine_loop.on_idle = None
            gone = _exited(followers, wait_s=3)
            gone = [f"rank {r} (pid {p.pid}) exited with status {p.poll()}" for r, p in gone]
            failed.append("; ".join(gone) or f"a collective failed: {error}")
            print(f"lamina: error: the tensor-parallel group failed: {failed[-1]}", file=sys.stderr)
            app.state.engine_loop.drain()  # nothing to drain (its requests failed): the signal stops it at once
            os.kill(os.getpid(), signal.SIGTERM)

        app.state.engine_loop.on_step_error = stop
        app.state.engine_loop.on_idle = parallel.heartbeat(tp, every_s=args.distributed_timeout / 3)
    _startup_lines(args, llama, path, name, tp)
    # uvicorn's own lines (and its access log: lamina writes its own line per request) only at debug; its warnings
    # at info and warning.
    server_level = args.log_level if args.log_level in ("debug", "error") else "warning"
    server = _draining_server(
        app,
        args.drain_timeout,
        host=args.host,
        port=args.port,
        log_level=server_level,
        access_log=args.log_level == "debug",
    )
    # Everything loaded so far (the model's modules, the tokenizer's tables, the app: ~200,000 objects with the
    # default model) lives as long as the server. Frozen, it is left out of the collector's full passes, each of
    # which walked it all with the engine thread waiting on the GIL (169 ms once, Zen 4): a pause of every stream,
    # more often where replies build many objects (a scored prompt's log-probabilities). New garbage is collected
    # as before.
    gc.collect()
    gc.freeze()
    try:
        server.run()
    finally:
        if tp is not None and not failed:
            try:
                parallel.release(tp)
            except RuntimeError:
                failed.append("a rank was gone at shutdown")
    return 1 if failed else 0


def _draining_server(app, drain_timeout: float, **config):
    """A uvicorn server whose first SIGTERM or Ctrl-C drains: new requests get 503 with Retry-After and /health says
    "draining" (503) while the requests in flight run to their ends, for up to `drain_timeout` seconds; then what is
    left is aborted (its streams end with finish_reason "abort") and it exits, status 0. A second signal stops it at
    once, as uvicorn does."""
    import threading
    import time

    import uvicorn

    loop, log = app.state.engine_loop, logging.getLogger("lamina.serve")

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if loop.draining or self.should_exit:
                return super().handle_exit(sig, frame)
            loop.drain()
            log.info(
                "%s: draining %d request(s) for up to %g s; new requests get 503 (again to stop at once)",
                signal.Signals(sig).name,
                loop.in_flight,
                drain_timeout,
            )
            threading.Thread(target=self._exit_when_drained, name="lamina-drain", daemon=True).start()

        def _exit_when_drained(self) -> None:
            deadline = time.monotonic() + drain_timeout
            while loop.in_flight and time.monotonic() < deadline:
                time.sleep(0.05)
            if loop.in_flight:  # their streams end now, with finish_reason "abort"
                log.warning("drain timeout: aborting %d request(s) still in flight", loop.in_flight)
                loop.stop()
            self.should_exit = True

    # Once drained, what the finished requests still have to send (the last events of a stream) gets 5 s.
    return DrainingServer(uvicorn.Config(app, timeout_graceful_shutdown=5, **config))


def _setup_logging(level: str) -> None:
    """The server's log on stderr: lamina's loggers at `level`, a timestamp on each line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("lamina")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def _startup_lines(args, llama, path: Path, name: str, tp) -> None:
    """What this server is: the model, how it computes, how much it can hold, and where to find it."""
    from lamina.engine.kv_cache import KVCache
    from lamina.quant import describe

    log = logging.getLogger("lamina.serve")
    c, e = llama.model.config, llama.config
    log.info(
        "model %s (%s, %.1fM parameters, %d layers), served as %r, max_seq_len %d",
        path.name,
        path,
        c.n_params / 1e6,
        c.n_layers,
        name,
        e.max_seq_len,
    )
    dtype = str(e.dtype).removeprefix("torch.")
    log.info("dtype %s, device %s, weights %s", dtype, e.device, describe(llama.model))
    paths = _kernel_path(llama), _prefill_path(llama), _decode_path(llama)
    log.info("kernel path %s; prefill %s; decode step %s", *paths)
    pool, kv = llama.core.pool, e.kv_dtype
    kv_name = kv if isinstance(kv, str) else str(kv).removeprefix("torch.")
    tokens = pool.num_blocks * pool.block_size
    size = tokens * KVCache.bytes_per_token(c, kv) / 2**20
    caching = "on" if pool.caching else "off"
    log.info(
        "KV cache %d tokens (%d blocks of %d, %s, %.0f MiB), batch %d, prefix caching %s",
        tokens,
        pool.num_blocks,
        pool.block_size,
        kv_name,
        size,
        e.max_batch_size,
        caching,
    )
    if tp is not None:
        log.info("tensor parallel across %d processes", tp.world_size)
    if llama.core.speculator is not None:
        log.info("speculative decoding: %s", llama.core.speculator.config.describe())
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    url = f"http://{host}:{args.port}"
    where = f" (listening on all addresses, {args.host})" if host != args.host else ""
    page = "no chat page (--no-ui)" if args.no_ui else f"chat page at {url}/"
    log.info("%s; API at %s/v1%s; Ctrl-C stops", page, url, where)


def _spawn_followers(world: int, argv: list[str]) -> list:
    """`lamina serve --tensor-parallel-size N` outside torchrun: this process becomes rank 0 and starts ranks
    1..N-1 as the same command on this host (in their own sessions: a Ctrl-C reaches rank 0 alone, which stops
    them), meeting on a free loopback port, as torchrun would set them up."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    group = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world)}
    group["LOCAL_WORLD_SIZE"] = str(world)
    os.environ.update(group, RANK="0", LOCAL_RANK="0")
    command = [sys.executable, "-m", "lamina", *argv]
    return [
        subprocess.Popen(
            command,
            env={**os.environ, **group, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        for r in range(1, world)
    ]


def _exited(followers, wait_s: float = 0.0) -> list:
    """The following ranks that have ended. A killed rank's sockets close before its exit can be collected, so a
    collective can fail before that rank's status is there: wait up to `wait_s` for one to end, then briefly for the
    others that go with it."""
    import time

    deadline = time.monotonic() + wait_s
    gone = [(r, p) for r, p in enumerate(followers or [], start=1) if p.poll() is not None]
    while not gone and time.monotonic() < deadline:
        time.sleep(0.05)
        gone = [(r, p) for r, p in enumerate(followers or [], start=1) if p.poll() is not None]
    if gone and wait_s:
        time.sleep(0.2)
        gone = [(r, p) for r, p in enumerate(followers or [], start=1) if p.poll() is not None]
    return gone


def _reap(followers) -> None:
    """Wait for the following ranks to end (they return once rank 0 says stop); end any that do not in 30 s."""
    import subprocess

    for p in followers:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _decode_path(llama) -> str:
    if llama.runner.native is not None:
        return "native C (one call a step: lamina/kernels/decode.c)"
    return "PyTorch, compiled" if llama.config.compile else "PyTorch, eager"


def _prefill_path(llama) -> str:
    """Where a prompt's pass runs: the native C step (int16 products over the blocks), or PyTorch's forward (its
    projections' many-row products in their prefill dtype)."""
    from lamina.quant import QLinear
    from lamina.quant.linear import NATIVE_MAX_ROWS

    native = llama.runner.native
    if native is not None and native.runs_prefill(NATIVE_MAX_ROWS + 1):
        return "native C step, int16 products over the blocks (lamina/kernels/decode.c)"
    dtypes = {str(m.prefill_dtype).removeprefix("torch.") for m in llama.model.modules() if isinstance(m, QLinear)}
    if not dtypes:
        return "PyTorch"
    short = f"; prefills of up to {NATIVE_MAX_ROWS} tokens in the native C step" if native is not None else ""
    return f"PyTorch, products in {', '.join(sorted(dtypes))}{short}"


def _kernel_path(llama) -> str:
    from lamina.kernels import cpu_features
    from lamina.quant import kernel_path

    path = kernel_path(llama.model)
    if path is None:
        return "none (no GGML-block weights on the CPU)"
    features = ", ".join(sorted(cpu_features())) or "baseline only"
    return f"{path} (CPU: {features})"


def _info(args) -> int:
    from lamina.loader import default_model_path, detect_format
    from lamina.quant import describe, weight_types

    llama = _load(args, show_progress=True)
    c = llama.model.config
    path = args.model or default_model_path()
    n_params = c.n_params
    rope = f"theta {c.rope_theta:g}" + (f", llama3 scaling x{c.rope_scaling.factor:g}" if c.rope_scaling else "")
    template = type(llama.formatter).__name__ if llama.formatter else "none"
    rows = [
        ("model", str(path)),
        ("format", detect_format(path)),
        ("architecture", "llama"),
        ("parameters", f"{n_params / 1e6:.1f}M"),
        ("layers", c.n_layers),
        ("dim", c.dim),
        ("heads", f"{c.n_heads} query, {c.n_kv_heads} key/value, head_dim {c.head_dim}"),
        ("ffn hidden", c.hidden_dim),
        ("vocabulary", c.vocab_size),
        ("context length", c.context_length or "not stated"),
        ("rope", rope),
        ("tied embeddings", "yes" if c.tie_embeddings else "no"),
        ("dtype", str(llama.config.dtype).removeprefix("torch.")),
        ("weights", describe(llama.model)),
        ("prefill", _prefill_path(llama)),
        ("decode step", _decode_path(llama)),
        ("kernel path", _kernel_path(llama)),
        ("device", str(llama.config.device)),
        ("max_seq_len", llama.config.max_seq_len),
        ("tokenizer", type(llama.tokenizer).__name__),
        (
            "chat template",
            {"ChatTemplate": "yes (the model's own)", "ChatFormat": "Llama 3 built-in"}.get(template, template),
        ),
        ("stop tokens", ", ".join(f"{t} {llama.tokenizer.decode([t])!r}" for t in sorted(llama.stop_tokens))),
        ("speculative", llama.core.speculator.config.describe() if llama.core.speculator else "off"),
    ]
    for key, value in rows:
        print(f"{key:>16}: {value}")
    print(f"{'tensor types':>16}:")
    for name, count, size, runs in weight_types(llama.model):
        print(f"{'':>16}  {name:<8} {count:>4} tensors {size / 2**20:>10.1f} MiB  {runs}")
    return 0


class _ProgressBar:
    """A one-line progress bar on stderr."""

    def __init__(self, label: str, width: int = 30):
        self.label, self.width, self.shown = label, width, False

    def __call__(self, done: int, total: int) -> None:
        filled = self.width * done // max(total, 1)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total}")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\r" + " " * (len(self.label) + self.width + 24) + "\r")
            sys.stderr.flush()
