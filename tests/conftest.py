"""Shared fixtures: Meta's reference implementation (llama-models + fairscale) and a small random checkpoint made
with it, saved in Meta's format."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import types
from pathlib import Path

import pytest
import torch

TINY_PARAMS = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 128256,
    "multiple_of": 32,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
}
MAX_SEQ_LEN = 64
MAX_BATCH = 4


def _stub_reference_vision_model() -> None:
    """llama-models' generation.py imports its vision model, which needs torchvision; PyPI's torchvision does not
    load beside the CPU torch build used here. The text path never touches it, so stand in an empty module."""
    name = "llama_models.llama3.multimodal.model"
    if name in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    stub = types.ModuleType(name)
    stub.CrossAttentionTransformer = type("CrossAttentionTransformer", (), {})
    sys.modules[name] = stub


_stub_reference_vision_model()


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    """Meta's Llama 3 tokenizer.model, as shipped inside the llama-models package."""
    spec = importlib.util.find_spec("llama_models")
    assert spec is not None and spec.submodule_search_locations, "llama-models is a test dependency"
    return Path(spec.submodule_search_locations[0]) / "llama3" / "tokenizer.model"


@pytest.fixture(scope="session")
def ref_tokenizer(tokenizer_path):
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def model_parallel():
    """fairscale's layers need a (one-process) model-parallel group."""
    import fairscale.nn.model_parallel.initialize as fs_init
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)
    yield


def make_reference_model(params: dict, seed: int, max_seq_len: int = MAX_SEQ_LEN, max_batch_size: int = MAX_BATCH):
    """Meta's reference Transformer with random weights (its layers leave weights uninitialised)."""
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    model = Transformer(ModelArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **params))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name == "output.weight":
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))  # peaked logits: greedy has clear winners
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model.eval()


def save_meta_checkpoint(path: Path, params: dict, shards: list[dict]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(shards):
        torch.save(shard, path / f"consolidated.{i:02d}.pth")
    return path


@pytest.fixture(scope="session")
def reference(model_parallel):
    """The reference model the tiny checkpoint was made from."""
    return make_reference_model(TINY_PARAMS, seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt(reference, tmp_path_factory) -> Path:
    """A Meta-format checkpoint (params.json + consolidated.00.pth) of the reference model."""
    return save_meta_checkpoint(tmp_path_factory.mktemp("tiny"), TINY_PARAMS, [reference.state_dict()])


@pytest.fixture(scope="session")
def llama(tiny_ckpt, tokenizer_path):
    from lamina import Llama

    return Llama.build(
        tiny_ckpt, tokenizer_path, max_seq_len=MAX_SEQ_LEN, max_batch_size=MAX_BATCH, device="cpu", dtype="float32"
    )


@pytest.fixture(scope="session")
def ref_llama(reference, ref_tokenizer):
    """Meta's generation loop (llama-models' Llama3) around the reference model."""
    from llama_models.llama3.generation import Llama3

    return Llama3(reference, ref_tokenizer, reference.params)


def reference_generate(ref_llama, prompts: list[list[int]], max_gen_len: int, temperature: float = 0.0, top_p=0.9):
    """Run llama-models' streaming Llama3.generate and collect, per prompt, the generated tokens (cut before the
    first stop token, at most max_gen_len) and their logprobs, as Meta's original batch `generate` returns them."""
    from llama_models.llama3.chat_format import LLMInput

    stop = set(ref_llama.tokenizer.stop_tokens)
    tokens = [[] for _ in prompts]
    logprobs = [[] for _ in prompts]
    done = [max_gen_len == 0] * len(prompts)
    inputs = [LLMInput(tokens=list(p)) for p in prompts]
    for step in ref_llama.generate(
        inputs, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len, logprobs=True
    ):
        for r in step:
            i = r.batch_idx
            if r.source != "output" or r.ignore_token or done[i]:
                continue
            if r.token in stop:
                done[i] = True
                continue
            tokens[i].append(r.token)
            logprobs[i].append(r.logprobs[0])
            done[i] = len(tokens[i]) >= max_gen_len
        if all(done):
            break
    return tokens, logprobs


def reference_prompt_logprobs(reference, tokens: list[int]) -> list[float]:
    """Teacher-forced log-probabilities of each token given those before it (0.0 for the first), from one full
    forward pass of the reference model."""
    with torch.inference_mode():
        logits = reference.forward(torch.tensor([tokens]), 0)[0]
    lp = torch.log_softmax(logits.float(), dim=-1)
    return [0.0] + [lp[j - 1, tokens[j]].item() for j in range(1, len(tokens))]
