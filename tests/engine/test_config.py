"""Device and dtype defaults: the fast choice for the machine, explicit choices always honoured."""

import pytest
import torch

from lamina import ConfigError
from lamina.engine import config


@pytest.mark.parametrize("native_bf16,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_cpu_default_dtype_follows_native_bfloat16(monkeypatch, native_bf16, expected):
    monkeypatch.setattr(config, "cpu_has_bf16", lambda: native_bf16)
    assert config.resolve_dtype(None, torch.device("cpu")) == expected
    assert config.resolve_dtype("fp32", torch.device("cpu")) == torch.float32  # an explicit choice wins
    assert config.resolve_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16


def test_cpu_flags_are_read_from_proc_cpuinfo():
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    assert config.cpu_has_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_unknown_dtype():
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        config.resolve_dtype("fp8", torch.device("cpu"))


def test_blocks_on_the_cpu_default_to_float32(monkeypatch):
    """lamina's native decode step computes in float32: a block-quantized model on the CPU gets it by default."""
    monkeypatch.setattr(config, "cpu_has_bf16", lambda: True)
    assert config.resolve_dtype(None, torch.device("cpu"), blocks=True) == torch.float32
    assert config.resolve_dtype(None, torch.device("cpu"), blocks=False) == torch.bfloat16
    assert config.resolve_dtype("bf16", torch.device("cpu"), blocks=True) == torch.bfloat16
