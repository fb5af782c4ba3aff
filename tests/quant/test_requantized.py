"""The default model (SmolLM2-135M-Instruct, Q4_1 and Q8_0) requantized to each GGML type of lamina.kernels.types
(every block format, F16 and BF16) by lamina's quantizer (GGML's reference rounding), written as a GGUF by the `gguf` package, and
run two ways: in its blocks (lamina.load's default for a GGUF on the CPU: the C decode step over lamina's int16
kernels) and as the float32 model of the same file's weights (quantize="none"). Both give the same greedy tokens, and
the same logits and log-probabilities within the bound of the mixed-file test (tests/quant/test_formats.py).

The model's rows of 576 weights are not whole blocks of the 256-weight formats (the K-quants, IQ4_XS): such a matrix
gets llama.cpp's fallback format, as lamina's quantize modes choose it (lamina.quant._format_for), so those files mix
formats as llama.cpp's do; only ffn_down (rows of 1536) is stored in the 256-weight format itself."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import lamina
from lamina import kernels
from lamina.engine.runner import ModelRunner
from lamina.kernels.types import TYPES
from lamina.loader import default_model_path
from lamina.quant import QEmbedding, QLinear, _format_for, ggml, kernel_path
from lamina.quant.linear import NATIVE_MAX_ROWS

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"no native kernel: {kernels.unavailable_reason()}")

# One batch of prompts of different lengths (21 tokens in all: the prefill's products run in the int16 kernels too),
# and a prompt scored with echo (25 tokens, at most NATIVE_MAX_ROWS: the int16 kernels as well).
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
PASSAGE = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris. It is named after Gustave"
GEN = 24


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread (the kernels share PyTorch's): on a shared 2-core machine the quantizer's small ops run
    several times slower with a second thread waiting for a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def source():
    """The default model's file as the `gguf` package reads it, and its tensors dequantized by gguf (float32)."""
    reader = gguf.GGUFReader(default_model_path())
    tensors = {t.name: torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}
    return reader, tensors


class Requantized:
    """The source model's matrices in lamina's blocks, each (tensor, format) made once (a fallback format's matrices
    are the same in several files), and those whose dequantization by gguf has been checked."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.made: dict[tuple[str, str], torch.Tensor] = {}
        self.agreed: set[tuple[str, str]] = set()

    def blocks(self, name: str, qtype: str) -> torch.Tensor:
        if (name, qtype) not in self.made:
            self.made[name, qtype] = ggml.quantize(self.tensors[name], qtype)
        return self.made[name, qtype]


@pytest.fixture(scope="module")
def requantized(source) -> Requantized:
    return Requantized(source[1])


def plan(tensors: dict[str, torch.Tensor], qtype: str) -> dict[str, str]:
    """The format of each tensor in the `qtype` file: every matrix (token_embd too, which SmolLM2 ties to the output)
    in `qtype` where its rows are whole blocks of it, else in the fallback lamina's `qtype` mode picks; norms F32."""
    return {
        name: _format_for(qtype.lower(), w.shape[1], output=False) if w.dim() == 2 else "F32"
        for name, w in tensors.items()
    }


def write_requantized(path, reader: gguf.GGUFReader, formats: dict[str, str], made: Requantized) -> None:
    """A GGUF of the source file's metadata (tokenizer and chat template included) and its tensors in `formats`."""
    writer = gguf.GGUFWriter(path, "llama")
    for key, field in reader.fields.items():
        # the writer adds the GGUF header's fields and the architecture; the file type would name Q4_1, which it is not
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)
    for t in reader.tensors:
        if formats[t.name] == "F32":
            writer.add_tensor(t.name, np.array(t.data, dtype=np.float32))
        else:
            raw = made.blocks(t.name, formats[t.name]).numpy()
            writer.add_tensor(t.name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType[formats[t.name]])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def check_file(path, source_reader: gguf.GGUFReader, formats: dict[str, str], made: Requantized) -> None:
    """gguf reads the file back: the same metadata, each tensor in its format with the bytes lamina's quantizer wrote,
    and gguf's dequantizer gives what lamina's does (bit for bit; once a matrix): the float model's weights are
    gguf's."""
    reader = gguf.GGUFReader(path)
    skip = ("GGUF.", "general.file_type")
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith(skip)}
    assert fields == {k: f.contents() for k, f in source_reader.fields.items() if not k.startswith(skip)}
    assert [t.name for t in reader.tensors] == list(formats)
    for t in reader.tensors:
        qtype = formats[t.name]
        assert t.tensor_type.name == qtype, t.name
        if qtype == "F32":
            continue
        data = torch.from_numpy(np.array(t.data).view(np.uint8).reshape(t.data.shape[0], -1))  # F16: as bytes
        assert torch.equal(data, made.blocks(t.name, qtype)), t.name
        if (t.name, qtype) not in made.agreed:
            theirs = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
            assert torch.equal(ggml.dequantize(data, qtype), theirs), f"{t.name} ({qtype})"
            made.agreed.add((t.name, qtype))


def prompt_logits(llama, ids: list[int], native: bool) -> torch.Tensor:
    """Logits [len(ids), vocab] of one prefill of `ids` by a fresh runner (one row of the cache a sequence)."""
    runner = ModelRunner(llama.model, llama.config, native=native)
    with torch.inference_mode():
        return runner.logits(runner.prefill([ids], [[0]]))


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position at which two token lists differ (one ending early counts), None where they are equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("qtype", list(TYPES))
def test_requantized_default_model_runs_in_its_blocks_as_its_float_model(
    source, requantized, tmp_path_factory, qtype
):
    """Greedy tokens equal, 24 for each prompt of a batch; the passage's logits within test_formats' bound for whole
    models, 1e-3 of the logits' scale (int16 activations carry ~3e-5 of each block's largest value per product), and
    log-probabilities (the passage's, echoed, and the generated tokens') within twice it: a log-probability is a
    logit less the log-sum-exp, each moved at most that much. Measured (2026-12, 2-core AMD EPYC, avx512 path): logits 5.7e-3 to
    1.2e-2 of a scale of 31 to 36 (Q3_K the most, 3.8e-4 of it), log-probabilities at most 2.8e-3."""
    reader, tensors = source
    formats = plan(tensors, qtype)
    path = tmp_path_factory.mktemp("requantized") / f"SmolLM2-135M-Instruct.{qtype}.gguf"
    write_requantized(path, reader, formats, requantized)
    check_file(path, reader, formats, requantized)

    ours = lamina.load(path, device="cpu", max_seq_len=128, max_batch_size=4)
    exact = lamina.load(path, device="cpu", dtype="float32", max_seq_len=128, max_batch_size=4, quantize="none")
    path.unlink()  # both hold their weights in memory; fourteen files of 80-280 MB need not stay on disk
    stored = {m.qtype for m in ours.model.modules() if isinstance(m, (QLinear, QEmbedding))}
    assert stored == set(formats.values()) - {"F32"}
    assert ours.config.dtype == torch.float32 and ours.runner.native is not None, "the C decode step runs"
    assert kernel_path(ours.model) is not None
    assert exact.runner.native is None and not any(isinstance(m, QLinear) for m in exact.model.modules())

    # The passage's logits in one prefill (its products in the int16 kernels), by runners sharing each model.
    ids = ours.tokenizer.encode(PASSAGE, bos=ours.tokenizer.add_bos, eos=False)
    assert len(ids) <= NATIVE_MAX_ROWS
    a, b = prompt_logits(ours, ids, native=True), prompt_logits(exact, ids, native=False)
    scale = b.abs().max().item()
    logit_diff = (a - b).abs().max().item()

    prompts = [ours.tokenizer.encode(p, bos=ours.tokenizer.add_bos, eos=False) for p in PROMPTS]
    got, got_lp = ours.generate(prompts, GEN, temperature=0, logprobs=True)
    want, want_lp = exact.generate(prompts, GEN, temperature=0, logprobs=True)
    (_,), (echo,) = ours.generate([ids], 0, logprobs=True, echo=True)
    (_,), (echo_exact,) = exact.generate([ids], 0, logprobs=True, echo=True)
    for i, (g, w) in enumerate(zip(got, want)):
        at = first_difference(g, w)
        assert at is None, f"{qtype}: prompt {i}'s greedy tokens differ from token {at}: {g[at:]} vs {w[at:]}"
    assert logit_diff <= 1e-3 * scale, f"{qtype}: prefill logits differ by {logit_diff:.3e} (scale {scale:.2f})"
    for name, xs, ys in (("echo", echo, echo_exact), ("generated", sum(got_lp, []), sum(want_lp, []))):
        diff = max(abs(x - y) for x, y in zip(xs, ys))
        assert diff <= 2e-3 * scale, f"{qtype}: {name} logprobs differ by {diff:.3e} (scale {scale:.2f})"
