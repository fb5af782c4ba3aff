"""Tensor parallelism on torch.distributed (lamina.parallel): models split across 2 and 4 processes started by
torchrun with gloo, against the single-process run and Meta's reference: greedy tokens of a ragged batch, logprobs
within 1e-4, sampled tokens with a seed, every rank returning the same; Meta checkpoints of 1, 2 and 4 shards into
each world size; the default GGUF with its blocks sharded; and launches that cannot work, refused in one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lamina
from lamina import parallel
from lamina.errors import ConfigError
from lamina.model import ModelConfig

from ..conftest import (
    MAX_BATCH,
    MAX_SEQ_LEN,
    TINY_PARAMS,
    reference_generate,
    reference_prompt_logprobs,
    save_meta_checkpoint,
)

WORKER = Path(__file__).with_name("tp_worker.py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path: Path, world: int, spec: dict) -> list[dict]:
    """Run tp_worker.py on `world` ranks; returns each rank's results, rank order."""
    out = tmp_path / f"out{world}"
    out.mkdir(exist_ok=True)
    spec_path = tmp_path / f"spec{world}.json"
    spec_path.write_text(json.dumps({**spec, "world": world, "out": str(out)}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(_port()), str(WORKER), str(spec_path)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


PROMPTS = [[128000, 791, 1330, 315], [128000, 40, 1093, 4059, 11, 1606, 1070, 374, 264], [128000, 9906]]


@pytest.fixture(scope="module")
def single(llama):
    tokens, logprobs = llama.generate(PROMPTS, 8, temperature=0, logprobs=True)
    sampled, _ = llama.generate(PROMPTS, 8, temperature=0.8, top_p=0.9, seed=7)
    return tokens, logprobs, sampled


def _spec(ckpt, tokenizer_path) -> dict:
    return {
        "kind": "meta",
        "ckpt": str(ckpt),
        "tokenizer": str(tokenizer_path),
        "max_seq_len": MAX_SEQ_LEN,
        "max_batch_size": MAX_BATCH,
        "prompts": PROMPTS,
        "max_gen_len": 8,
    }


def _check_ranks(ranks: list[dict], tokens, logprobs, sampled) -> None:
    for r in ranks:
        assert r["tokens"] == tokens
        for ours, theirs in zip(r["logprobs"], logprobs):
            assert ours == pytest.approx(theirs, abs=1e-4)
        assert r["sampled"] == sampled
        assert r["logprobs"] == ranks[0]["logprobs"]  # every rank computes the very same logits


@pytest.mark.parametrize("world", [2, 4])
def test_meta_checkpoint_across_processes_equals_one_process_and_the_reference(
    tmp_path, tiny_ckpt, tokenizer_path, single, ref_llama, reference, world
):
    ranks = torchrun(tmp_path, world, _spec(tiny_ckpt, tokenizer_path))
    tokens, logprobs, sampled = single
    _check_ranks(ranks, tokens, logprobs, sampled)
    ref_tokens, _ = reference_generate(ref_llama, PROMPTS, max_gen_len=8)
    assert ranks[0]["tokens"] == ref_tokens
    for p, t, ours in zip(PROMPTS, ref_tokens, ranks[0]["logprobs"]):
        # against Meta's full forward pass (its incremental loop drifts ~2e-4 from it: see tests/engine)
        assert ours == pytest.approx(reference_prompt_logprobs(reference, p + t)[len(p) :], abs=1e-4)
    H, KVH, F = TINY_PARAMS["n_heads"], TINY_PARAMS["n_kv_heads"], ranks[0]["local_heads"][2] * world
    # each rank holds its share of the heads and hidden units, and caches only its key/value heads
    assert [r["local_heads"] for r in ranks] == [[H // world, max(KVH // world, 1), F // world]] * world
    assert all(r["cache_heads"] == max(KVH // world, 1) for r in ranks)


@pytest.mark.parametrize("shards, world", [(2, 2), (4, 2), (2, 4), (4, 1)])
def test_meta_shards_into_any_world_size(tmp_path, reference, tokenizer_path, single, shards, world):
    from llama_models.checkpoint import reshard_mp

    full = reference.state_dict()
    repeat = max(shards // TINY_PARAMS["n_kv_heads"], 1)
    pieces = [reshard_mp([full], size=shards, rank=r, repeat_qk_qv=repeat) for r in range(shards)]
    ckpt = save_meta_checkpoint(tmp_path / f"ckpt{shards}", TINY_PARAMS, pieces)
    tokens, logprobs, sampled = single
    if world == 1:
        built = lamina.Llama.build(ckpt, tokenizer_path, MAX_SEQ_LEN, MAX_BATCH, device="cpu", dtype="float32")
        assert built.generate(PROMPTS, 8, temperature=0)[0] == tokens
        return
    _check_ranks(torchrun(tmp_path, world, _spec(ckpt, tokenizer_path)), tokens, logprobs, sampled)


def test_default_gguf_blocks_sharded(tmp_path):
    """SmolLM2's 9 heads and 3 key/value heads split 3 ways; its Q4_1/Q8_0 blocks cut by rows and whole blocks."""
    one = lamina.load(device="cpu", dtype="float32", max_seq_len=128)
    prompts = [one.tokenizer.encode(p, bos=False, eos=False) for p in ("The capital of France is", "def add(a, b):")]
    tokens, logprobs = one.generate(prompts, 8, temperature=0, logprobs=True)
    sampled, _ = one.generate(prompts, 8, temperature=0.8, top_p=0.9, seed=7)
    spec = {"kind": "gguf", "max_seq_len": 128, "max_batch_size": 2, "prompts": prompts, "max_gen_len": 8}
    ranks = torchrun(tmp_path, 3, spec)
    for r in ranks:  # int16 activations per block on each rank's slice: products within ~1e-5 relative
        assert r["tokens"] == tokens
        for ours, theirs in zip(r["logprobs"], logprobs):
            assert ours == pytest.approx(theirs, abs=2e-3)
    assert [r["local_heads"] for r in ranks] == [[3, 1, 512]] * 3


def test_default_gguf_c_step_sharded_and_each_rank_holds_its_share(tmp_path):
    """Under tensor parallelism each rank runs lamina's C decode step on its shard (the two sums of each layer called
    back into torch.distributed): greedy tokens equal one process's, and so do those of the PyTorch forward under
    tensor parallelism. Logprobs within 2e-3: int16 activations turn a last-bit change of a sum (summed in another
    order) into a quantization step, as between the C step and the PyTorch forward in one process (~6e-4 here).
    Each rank holds a third of the weights: vocabulary tables split too, nothing replicated but the norms."""
    one = lamina.load(device="cpu", dtype="float32", max_seq_len=128)
    assert one.runner.native is not None
    prompts = [one.tokenizer.encode(p, bos=False, eos=False) for p in ("The capital of France is", "def add(a, b):")]
    tokens, logprobs = one.generate(prompts, 8, temperature=0, logprobs=True)
    whole = sum(t.numel() * t.element_size() for t in [*one.model.parameters(), *one.model.buffers()])
    spec = {"kind": "gguf", "max_seq_len": 128, "max_batch_size": 2, "prompts": prompts, "max_gen_len": 8}
    ranks = torchrun(tmp_path, 3, {**spec, "pytorch_too": True})
    for r in ranks:
        assert r["c_step"]
        assert r["tokens"] == tokens and r["pytorch_tokens"] == tokens
        for ours, theirs in zip(r["logprobs"] + r["pytorch_logprobs"], logprobs + logprobs):
            assert ours == pytest.approx(theirs, abs=2e-3)
        norms = one.model.config.dim * 4 * (2 * one.model.config.n_layers + 1)  # replicated on every rank
        assert r["weight_bytes"] == pytest.approx((whole - norms) / 3 + norms, rel=0.01)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculative_decoding_sharded(tmp_path, method):
    """Speculative decoding where every rank runs the engine on its third of the default GGUF: prompt lookup, or the
    default file as an (unsharded) draft model. Each rank plans its steps from rank 0's step times, so all verify the
    same drafts in the same steps; greedy and seeded tokens are one process's without speculation, drafts were
    verified and accepted, and no block is left behind."""
    one = lamina.load(device="cpu", dtype="float32", max_seq_len=256)
    chats = ["Repeat exactly: the quick brown fox jumps over the lazy dog.", "Count from one to twelve in words."]
    prompts = [one.encode_dialog([{"role": "user", "content": c}]) for c in chats]
    tokens, logprobs = one.generate(prompts, 32, temperature=0, logprobs=True)
    sampled, _ = one.generate(prompts, 32, temperature=0.8, top_p=0.9, seed=7)
    config = {"method": "ngram", "num_speculative_tokens": 6, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    if method == "draft_model":
        config = {"model": str(lamina.loader.default_model_path()), "num_speculative_tokens": 4}
    spec = {"kind": "gguf", "max_seq_len": 256, "max_batch_size": 2, "prompts": prompts, "max_gen_len": 32}
    ranks = torchrun(tmp_path, 3, {**spec, "speculative_config": config})
    for r in ranks:
        assert r["tokens"] == tokens and r["sampled"] == sampled
        for ours, theirs in zip(r["logprobs"], logprobs):
            assert ours == pytest.approx(theirs, abs=2e-3)
        assert r["spec"] == ranks[0]["spec"]  # the same drafts verified on every rank
        drafts, draft_tokens, accepted = r["spec"]
        assert drafts > 0 and accepted > 0
        assert r["used_blocks"] == 0


def test_loaders_read_each_rank_its_part(tmp_path, tiny_ckpt):
    """What a loader reads through `select` (a rank's part of each weight) equals the same part cut from the whole
    model: GGUF blocks by rows and whole-block columns, Meta checkpoints of 1 and 2 shards (pieces overlapped or
    merged), Hugging Face safetensors (q/k rows permuted per head)."""
    import functools

    from llama_models.checkpoint import reshard_mp

    from lamina.weights import load_gguf, load_hf_checkpoint, load_meta_checkpoint

    from ..weights.test_hf import make_hf_llama

    def same(a, b):
        if isinstance(a, lamina.quant.Blocks):
            return a.qtype == b.qtype and a.cols == b.cols and torch.equal(a.data, b.data)
        return torch.equal(a, b)

    def check(load, world):
        config, whole = load(None)[:2]
        for rank in range(world):
            tp = parallel.TensorParallel(rank, world)
            got = load(functools.partial(parallel.span, tp=tp))[1]
            _, want = parallel.shard(config, whole, tp)
            assert got.keys() == want.keys()
            assert all(same(got[n], want[n]) for n in want), [n for n in want if not same(got[n], want[n])]

    gguf = lamina.loader.default_model_path()
    check(lambda select: load_gguf(gguf, keep=True, select=select), 3)
    check(lambda select: load_gguf(gguf, keep=False, select=select), 3)
    check(lambda select: load_meta_checkpoint(tiny_ckpt, select), 2)
    full = torch.load(Path(tiny_ckpt) / "consolidated.00.pth", weights_only=True)
    two = save_meta_checkpoint(tmp_path / "two", TINY_PARAMS, [reshard_mp([full], size=2, rank=r) for r in range(2)])
    check(lambda select: load_meta_checkpoint(two, select), 2)
    check(lambda select: load_meta_checkpoint(two, select), 4)
    hf = tmp_path / "hf"
    make_hf_llama(hf, tie=False, shard=True)
    check(lambda select: load_hf_checkpoint(hf, None, select), 2)


def test_vocabulary_rows_cover_every_id_once():
    for vocab, world in [(128256, 3), (49152, 3), (10, 4), (7, 2)]:
        rows = [parallel.vocab_rows(vocab, parallel.TensorParallel(r, world)) for r in range(world)]
        assert rows[0][0] == 0 and rows[-1][1] == vocab
        assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
        assert max(hi - lo for lo, hi in rows) == -(-vocab // world)


def test_launches_that_cannot_work():
    config = ModelConfig(dim=576, n_layers=1, n_heads=9, n_kv_heads=3, vocab_size=10, hidden_dim=1536)
    with pytest.raises(ConfigError, match="tensor parallel size 2 does not divide the model's 9 attention heads"):
        parallel.local_config(config, 2)
    config = ModelConfig(dim=96, n_layers=1, n_heads=12, n_kv_heads=4, vocab_size=10, hidden_dim=96, head_dim=8)
    with pytest.raises(ConfigError, match="nor is it a multiple of the model's 4 key/value heads"):
        parallel.local_config(config, 3)
    with pytest.raises(ConfigError, match=r"needs as many processes \(started outside torchrun\)"):
        lamina.Llama.build("/nonexistent", "/nonexistent", 64, 1, model_parallel_size=2, device="cpu")
    with pytest.raises(ConfigError, match="needs as many processes"):
        lamina.load(tensor_parallel_size=2)


def test_blocks_split_by_columns_only_in_whole_blocks():
    from lamina.quant import Blocks

    w = Blocks("Q4_1", torch.zeros(4, 3 * 20, dtype=torch.uint8), 96)
    tp = parallel.TensorParallel(rank=1, world_size=2)
    config = ModelConfig(dim=96, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=10, hidden_dim=96)
    with pytest.raises(
        ConfigError, match=r"layers.0.feed_forward.w2.weight: Q4_1 blocks of 32 columns cannot be split 2"
    ):
        parallel.shard(config, {"layers.0.feed_forward.w2.weight": w}, tp)


def test_cli_under_torchrun_prints_once_and_equals_one_process(tmp_path):
    """`torchrun --nproc-per-node 3 -m lamina generate ...`: the default GGUF split 3 ways, the answer printed once
    (rank 0), the same greedy tokens as one process."""
    args = ["generate", "The capital of France is", "--temperature", "0", "-n", "8", "--json", "--max-seq-len", "64"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    one = subprocess.run([sys.executable, "-m", "lamina", *args], capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(_port()), "-m", "lamina", *args]
    three = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert three.returncode == 0, three.stderr[-3000:]
    lines = [line for line in three.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    assert json.loads(lines[0])["ids"] == json.loads(one.stdout)["ids"]


def test_cli_refuses_a_launch_that_cannot_work(tmp_path):
    """Two ranks cannot split SmolLM2's 9 heads: every rank says so in one line and the launch fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(_port()), "-m", "lamina", "generate", "hi", "-n", "2", "--max-seq-len", "64"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0
    assert "lamina: error: [rank 0] tensor parallel size 2 does not divide the model's 9 attention heads" in proc.stderr
    assert "lamina: error: [rank 1] tensor parallel size 2" in proc.stderr


def test_server_across_three_processes(tmp_path):
    """`lamina serve --tensor-parallel-size 3`: rank 0 runs the scheduler, the sampler and the HTTP server, the other
    two follow each forward pass. The openai client gets offline greedy's tokens, a stream, concurrent requests; a
    Ctrl-C stops every rank."""
    import signal

    from openai import OpenAI

    one = lamina.load(device="cpu", dtype="float32", max_seq_len=128)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    expected = [
        one.tokenizer.decode(t)
        for t in one.generate([one.tokenizer.encode(p, bos=False, eos=False) for p in prompts], 12, temperature=0)[0]
    ]
    port = _port()
    proc = _serve_three(port, "--max-seq-len", "128", "--max-batch-size", "4")
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        model = client.models.list().data[0].id
        got = client.completions.create(model=model, prompt=prompts, max_tokens=12, temperature=0)
        assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == expected
        stream = client.completions.create(model=model, prompt=prompts[1], max_tokens=12, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream) == expected[1]
        followers = _children(proc.pid)
        assert len(followers) == 2
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: rank 0 stops serving, then stops the ranks it started
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-3000:]
        assert not _children(proc.pid) and all(not _alive(pid) for pid in followers)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _serve_three(port: int, *options: str) -> subprocess.Popen:
    """`lamina serve --tensor-parallel-size 3` in a session of its own, once it answers /health."""
    import httpx

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "lamina", "serve", "--tensor-parallel-size", "3", "--port", str(port), *options]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the server did not come up: {proc.stderr.read()[-3000:]}")


def test_an_idle_server_keeps_its_ranks():
    """Following ranks wait for the next step in a collective that fails after the group's timeout; rank 0's heartbeat
    keeps them waiting through an idle spell longer than that (here a 3 s timeout, 7 s idle)."""
    import signal

    from openai import OpenAI

    port = _port()
    proc = _serve_three(port, "--max-seq-len", "64", "--distributed-timeout", "3")
    try:
        followers = _children(proc.pid)
        time.sleep(7)
        assert proc.poll() is None and all(_alive(pid) for pid in followers)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        model = client.models.list().data[0].id
        assert client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0).choices[0].text
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return (
        subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()[:1] != "Z"
    )


def test_a_rank_killed_mid_stream_fails_the_request_and_stops_the_server():
    """A following rank dies while a stream runs: the stream ends in an error, the server says which rank went, and
    every process is gone within 30 s, rank 0 with a non-zero status."""
    import signal

    import httpx

    port = _port()
    proc = _serve_three(port, "--max-seq-len", "512")
    try:
        followers = _children(proc.pid)
        body = {"prompt": "Count to a thousand:", "max_tokens": 400, "stream": True, "ignore_eos": True}
        events = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            events.append(next(line for line in lines if line.startswith("data:")))
            os.kill(followers[0], signal.SIGKILL)
            start = time.monotonic()
            try:
                events += [line for line in lines if line.startswith("data:")]
            except httpx.HTTPError:
                pass  # the connection may close with the server
        assert not any('"finish_reason": "length"' in e for e in events)  # never presented as a complete answer
        assert proc.wait(timeout=30) != 0
        assert time.monotonic() - start < 30
        err = proc.stderr.read()
        assert f"rank 1 (pid {followers[0]}) exited" in err, err[-3000:]
        time.sleep(1)
        assert all(not _alive(pid) for pid in followers)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in _children(proc.pid):
            os.kill(pid, signal.SIGKILL)


def test_two_nodes_on_loopback(tmp_path, tiny_ckpt, tokenizer_path, single):
    """Two torchrun commands, one rank each, meeting through torchrun's c10d rendezvous on 127.0.0.1 (as two hosts
    would with --rdzv-endpoint HOST:PORT): the same results as one process."""
    out = tmp_path / "out"
    out.mkdir()
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps({**_spec(tiny_ckpt, tokenizer_path), "world": 2, "out": str(out)}))
    endpoint = f"127.0.0.1:{_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                "lamina-test",
                "--node-rank",
                str(node),
                str(WORKER),
                str(spec_path),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for node in range(2)
    ]
    try:
        for node in nodes:
            _, err = node.communicate(timeout=300)
            assert node.returncode == 0, err[-3000:]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    tokens, logprobs, sampled = single
    _check_ranks([json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], tokens, logprobs, sampled)


def test_hugging_face_checkpoint_sharded_safetensors(tmp_path):
    """A Hugging Face directory (a random Llama written by transformers in two safetensors shards, SmolLM2's
    tokenizer beside it) split 2 ways: the same greedy tokens, logprobs within 1e-4 and seeded samples as one process."""
    from transformers import AutoTokenizer

    from lamina.loader import default_model_path

    from ..weights.test_hf import make_hf_llama

    gguf = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    path = tmp_path / "hf"
    path.mkdir()
    tok.save_pretrained(path)
    make_hf_llama(path, tie=False, shard=True, vocab_size=len(tok))
    one = lamina.load(path, device="cpu", dtype="float32", max_seq_len=64)
    prompts = [[1, 504, 3458, 282], [1, 378, 1429, 30, 31, 32, 33]]
    tokens, logprobs = one.generate(prompts, 8, temperature=0, logprobs=True)
    sampled, _ = one.generate(prompts, 8, temperature=0.8, top_p=0.9, seed=7)
    spec = {"kind": "path", "path": str(path), "max_seq_len": 64, "max_batch_size": 2, "prompts": prompts}
    _check_ranks(torchrun(tmp_path, 2, {**spec, "max_gen_len": 8}), tokens, logprobs, sampled)


def test_ranks_that_load_different_models_are_refused(tmp_path):
    """Rank 0 and rank 1 given different files of the same shapes: an error naming both, not a wrong model."""
    import shutil

    from lamina.loader import default_model_path

    copy = tmp_path / "copy.gguf"
    shutil.copy(default_model_path(), copy)
    spec = {
        "kind": "path",
        "per_rank_paths": [str(default_model_path()), str(copy), str(default_model_path())],
        "max_seq_len": 64,
        "max_batch_size": 1,
        "prompts": [[1, 2, 3]],
        "max_gen_len": 2,
    }
    out = tmp_path / "out"
    out.mkdir()
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps({**spec, "world": 3, "out": str(out)}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(_port()), str(WORKER), str(spec_path)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0
    assert "the ranks disagree on the model: rank 0 has" in proc.stderr and "rank 1 has" in proc.stderr
    assert str(copy) in proc.stderr
