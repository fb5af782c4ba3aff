"""The Llama transformer: RMSNorm, rotary embeddings, grouped-query attention over a caller-owned KV cache, SwiGLU.

Tokens arrive flattened, `[N]`, never padded. A forward pass is either a *prefill* of sequences packed end to end
(each attends causally to itself, and to its cached earlier positions when it is a later chunk of a prompt) or a
*decode* step of one token per running sequence (each attends to its cached positions). The caller owns the cache:
per layer a pair of `[blocks, n_kv_heads, block_size, head_dim]` tensors; a sequence's positions lie in the blocks of
its block table, in order (a whole row per sequence is the case block_size = max_seq_len). Every forward writes its
keys and values there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lamina.errors import WeightsError
from lamina.model import rope
from lamina.model.config import ModelConfig

KVCacheLayers = Sequence[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Prefill:
    """Sequences packed end to end. Token i is at position `positions[i]` of its sequence and is cached in block
    `blocks[i]` at `offsets[i]`. Sequence j brings positions starts[j]..starts[j] + seq_lens[j] - 1; those before
    starts[j] (an earlier chunk of the same prompt) are cached already, in the blocks `tables[j]` lists in order, and
    its tokens attend to them too."""

    blocks: torch.Tensor  # [N] int64
    offsets: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64, starts[j]..starts[j]+len-1 within each sequence
    seq_lens: tuple[int, ...]  # lengths of the packed sequences, in order; they sum to N
    starts: tuple[int, ...] | None = None  # None: every sequence starts at 0 (fresh)
    tables: tuple[torch.Tensor, ...] | None = None  # each sequence's blocks; needed where starts[j] > 0


@dataclass(frozen=True)
class Decode:
    """One new token per running sequence b, at `positions[b]`, cached in block `blocks[b]` at `offsets[b]`; the
    sequence's earlier positions are in the blocks of `tables[b]`, in order."""

    blocks: torch.Tensor  # [B] int64
    offsets: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64
    tables: torch.Tensor  # [B, blocks per sequence] int64, padded with any block (masked out)
    kv_len: int  # max(positions) + 1: how much of the cache any sequence can see
    contiguous: bool  # sequence b's only block is b (a whole cache row each): rows can be sliced, not gathered


def _gather(cache: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` positions of the sequences whose blocks `tables` [..., n] lists, from a cache
    [blocks, KVH, block_size, D]: [..., KVH, length, D]."""
    tables = tables[..., : -(-length // cache.shape[2])]  # only the blocks that hold those positions
    if tables.dim() == 1 and tables.shape[0] == 1:  # one block: a view, no copy
        return cache[int(tables[0]), :, :length]
    picked = cache[tables]  # [..., n, KVH, BS, D]: a copy (in float, from a quantized cache)
    picked = picked.movedim(-4, -3)  # [..., KVH, n, BS, D]
    return picked.flatten(-3, -2)[..., :length, :]


def _as_cached(cache, x: torch.Tensor) -> torch.Tensor:
    """x as the cache gives it back once stored: rounded to a 16-bit cache's dtype, or through a quantized cache's
    `round`. Attention reads keys and values so rounded whether they come from this pass or the cache, so a
    prompt's output does not depend on which of its positions were cached before."""
    if isinstance(cache, torch.Tensor):
        return x if cache.dtype == x.dtype else x.to(cache.dtype).to(x.dtype)
    return cache.round(x)


def _fresh_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Fresh sequences (by index into `lengths`) grouped for one padded attention call each: sorted by length, a
    group grows while padding every member to its longest costs at most twice the scores they need, so many short
    prompts share a call and one long prompt never pads the short ones to its length."""
    groups: list[list[int]] = []
    need = 0
    for j in sorted(range(len(lengths)), key=lengths.__getitem__):
        T = lengths[j]
        if groups and (len(groups[-1]) + 1) * T * T <= 2 * (need + T * T):
            groups[-1].append(j)
            need += T * T
        else:
            groups.append([j])
            need = T * T
    return groups


def _prefill_attention(q, k, v, batch: Prefill, k_cache, v_cache) -> torch.Tensor:
    """Each packed sequence's queries [T, H, D] against its own keys causally (and a later chunk's also against its
    cached start), nothing spent on cross-sequence pairs: fresh sequences of similar length in one padded call
    (`_fresh_groups`), each later chunk in its own. Returns [N, H, D] in packed order."""
    starts = batch.starts or (0,) * len(batch.seq_lens)
    qs, ks, vs = q.split(batch.seq_lens), k.split(batch.seq_lens), v.split(batch.seq_lens)
    outs: list[torch.Tensor | None] = [None] * len(qs)
    fresh = [j for j, start in enumerate(starts) if start == 0]
    for group in _fresh_groups([batch.seq_lens[j] for j in fresh]):
        members = [fresh[i] for i in group]
        if len(members) == 1:  # alone: causal over its own keys, no mask to build
            j = members[0]
            o = F.scaled_dot_product_attention(
                qs[j].transpose(0, 1)[None],
                ks[j].transpose(0, 1)[None],
                vs[j].transpose(0, 1)[None],
                is_causal=True,
                enable_gqa=True,
            )
            outs[j] = o[0].transpose(0, 1)
            continue
        lengths = torch.tensor([batch.seq_lens[j] for j in members], device=q.device)
        T = int(lengths.max())
        pad = [nn.utils.rnn.pad_sequence([x[j] for j in members], batch_first=True) for x in (qs, ks, vs)]
        pos = torch.arange(T, device=q.device)
        # Causal, and only a sequence's own keys: padded keys never count; padded queries are computed and dropped.
        mask = (pos[None, :] <= pos[:, None])[None] & (pos < lengths[:, None])[:, None, :]  # [S, T, T]
        o = F.scaled_dot_product_attention(  # [S, H, T, D]
            *(x.transpose(1, 2) for x in pad), attn_mask=mask[:, None], enable_gqa=True
        )
        for i, j in enumerate(members):
            outs[j] = o[i, :, : batch.seq_lens[j]].transpose(0, 1)
    for j, start in enumerate(starts):
        if start == 0:
            continue
        T = qs[j].shape[0]  # a later chunk: the cached positions before it, then its own, causally
        keys = _gather(k_cache, batch.tables[j], start + T).to(q.dtype)
        values = _gather(v_cache, batch.tables[j], start + T).to(q.dtype)
        mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(start)
        o = F.scaled_dot_product_attention(
            qs[j].transpose(0, 1)[None], keys[None], values[None], attn_mask=mask, enable_gqa=True
        )
        outs[j] = o[0].transpose(0, 1)
    return torch.cat(outs)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, *, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the weights' dtype, as Meta's model does. (F.rms_norm is no faster on the
        # CPU: it decomposes into more operations than these.)
        xf = x.float()
        return (xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, *, device=None, dtype=None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        kw = dict(bias=False, device=device, dtype=dtype)
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, **kw)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, **kw)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, **kw)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, **kw)
        self.wqkv: nn.Module | None = None  # wq, wk and wv as one projection, where a quantized model fuses them

    def forward(self, x, cos, sin, batch: Prefill | Decode, mask, k_cache, v_cache) -> torch.Tensor:
        N, H, KVH, D = x.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv is not None:  # queries and keys side by side: one rotation for both
            qk, v = self.wqkv(x).split([(H + KVH) * D, KVH * D], -1)
            q, k = rope.apply_rotary(qk.view(N, H + KVH, D), cos, sin).split([H, KVH], 1)
        else:
            q = rope.apply_rotary(self.wq(x).view(N, H, D), cos, sin)
            k = rope.apply_rotary(self.wk(x).view(N, KVH, D), cos, sin)
            v = self.wv(x)
        v = v.reshape(N, KVH, D)
        k_cache[batch.blocks, :, batch.offsets] = k.to(k_cache.dtype)
        v_cache[batch.blocks, :, batch.offsets] = v.to(v_cache.dtype)
        k, v = _as_cached(k_cache, k), _as_cached(v_cache, v)

        if isinstance(batch, Prefill):
            out = _prefill_attention(q, k, v, batch, k_cache, v_cache)
        else:
            # Attend over the filled part of each sequence's cache row only, masked to its own length.
            if batch.contiguous:
                keys, values = k_cache[:N, :, : batch.kv_len], v_cache[:N, :, : batch.kv_len]
            else:
                keys, values = (
                    _gather(k_cache, batch.tables, batch.kv_len),
                    _gather(v_cache, batch.tables, batch.kv_len),
                )
            keys, values = keys.to(q.dtype), values.to(q.dtype)
            out = F.scaled_dot_product_attention(  # [B, H, 1, D]
                q[:, :, None, :], keys, values, attn_mask=mask, enable_gqa=True
            )[:, :, 0, :]
        return self.wo(out.reshape(N, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, *, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.w1 = nn.Linear(dim, hidden_dim, **kw)
        self.w2 = nn.Linear(hidden_dim, dim, **kw)
        self.w3 = nn.Linear(dim, hidden_dim, **kw)
        self.w13: nn.Module | None = None  # w1 and w3 as one projection, where a quantized model fuses them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, *, device=None, dtype=None):
        super().__init__()
        self.attention = Attention(config, device=device, dtype=dtype)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim, device=device, dtype=dtype)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps, device=device, dtype=dtype)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps, device=device, dtype=dtype)

    def forward(self, x, cos, sin, batch, mask, k_cache, v_cache) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, batch, mask, k_cache, v_cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Weights only: the KV cache and all per-request state belong to the caller."""

    def __init__(self, config: ModelConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        # Every load builds the model on the meta device and assigns the weights; random init and arithmetic on meta
        # tensors would import torch's compiler stack (sympy and all: ~35 MB of RSS and a second of loading).
        meta = device is not None and torch.device(device).type == "meta"
        if meta:
            table = torch.empty(config.vocab_size, config.dim, device=device, dtype=dtype)
            self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim, _weight=table)
        else:
            self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            TransformerBlock(config, device=device, dtype=dtype) for _ in range(config.n_layers)
        )
        self.norm = RMSNorm(config.dim, config.norm_eps, device=device, dtype=dtype)
        self.output = None
        if not config.tie_embeddings:
            self.output = nn.Linear(config.dim, config.vocab_size, bias=False, device=device, dtype=dtype)
        if meta:
            inv_freq = torch.empty(config.head_dim // 2, device=device)
        else:
            inv_freq = rope.inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling, device=device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, tokens: torch.Tensor, batch: Prefill | Decode, kv_cache: KVCacheLayers) -> torch.Tensor:
        """tokens [N] -> final normalised hidden states [N, dim]; writes each layer's keys/values into kv_cache."""
        h = self.tok_embeddings(tokens)
        cos, sin = rope.rotation(self.inv_freq, batch.positions)
        mask = None
        if isinstance(batch, Decode):
            key_pos = torch.arange(batch.kv_len, device=tokens.device)
            mask = (key_pos[None, :] <= batch.positions[:, None])[:, None, None, :]  # [B, 1, 1, kv_len]
        for layer, (k_cache, v_cache) in zip(self.layers, kv_cache, strict=True):
            h = layer(h, cos, sin, batch, mask, k_cache, v_cache)
        return self.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [n, dim] -> float32 logits [n, vocab]. Call it only on the rows whose logits are used."""
        if self.output is None:  # tied to the embeddings
            return F.linear(h, self.tok_embeddings.weight).float()
        return self.output(h).float()


def build_transformer(
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    *,
    device: torch.device,
    dtype: torch.dtype,
    modules: dict[str, nn.Module | None] | None = None,
) -> Transformer:
    """A Transformer holding `state_dict`'s tensors, moved to `device` and cast to `dtype` (a tensor already on
    `device` in `dtype` is used as it is, not copied; the model is built on the meta device, never initialised).

    `modules` replaces submodules by path ("layers.0.attention.wq", "output") with ready ones (quantized layers), or
    removes them (None: a projection fused into another); their weights are not looked for in `state_dict`. Every
    other weight must be there, and nothing else."""
    model = Transformer(config, device=torch.device("meta"), dtype=dtype)
    modules = modules or {}
    for path, module in modules.items():
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, module)
    tensors = {
        name: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for name, t in state_dict.items()
    }
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    replaced = tuple(f"{path}." for path in modules)
    missing = [name for name in missing if not name.startswith(replaced)]
    if missing or unexpected:
        raise WeightsError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.inv_freq = rope.inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling, device=device)
    return model.eval().requires_grad_(False)
