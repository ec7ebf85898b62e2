"""Canonical layers. Module names are the canonical names:
``embed.{tok,pos,type,norm}``, ``attn.{norm,qkv,q_norm,k_norm,out}``, ``mlp.{norm,up,gate,down}``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812  (the usual PyTorch alias)
from torch import nn

from eet_pipe import ops
from eet_pipe.models.config import ArchConfig
from eet_pipe.models.kv_cache import KVCache
from eet_pipe.models.meta import StepMeta

__all__ = ["Norm", "Embedding", "Attention", "MLP", "TransformerLayer", "LMHead", "attention_mask", "window_valid"]


class Norm(nn.Module):
    """LayerNorm or RMSNorm, chosen by the config, over the last `width` features (default hidden_size; head_dim
    for the per-head q/k norms)."""

    def __init__(self, cfg: ArchConfig, width: int | None = None) -> None:
        super().__init__()
        width = cfg.hidden_size if width is None else width
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(width))
        has_bias = cfg.norm == "layernorm" and cfg.norm_bias
        self.bias = nn.Parameter(torch.zeros(width)) if has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm":
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def residual(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual) through the fused op."""
        if self.kind == "rmsnorm":
            return ops.residual_rms_norm(x, residual, self.weight, self.eps)
        return ops.residual_layer_norm(x, residual, self.weight, self.bias, self.eps)


class Embedding(nn.Module):
    """Token (+ learned position) (+ token type) embeddings (+ norm)."""

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = nn.Embedding(cfg.max_positions, cfg.hidden_size) if cfg.positions == "learned" else None
        # "type" would shadow nn.Module.type(), so the canonical name is registered explicitly.
        self._modules["type"] = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size else None
        self.norm = Norm(cfg) if cfg.embed_norm else None

    def forward(self, ids: torch.Tensor, meta: StepMeta) -> torch.Tensor:  # ids: [B, T] -> [B, T, H]
        x = self.tok(ids)
        if self.pos is not None:
            x = x + self.pos(meta.positions)
        type_embed = self._modules["type"]
        if type_embed is not None:
            types = meta.token_types if meta.token_types is not None else torch.zeros_like(ids)
            x = x + type_embed(types)
        return self.norm(x) if self.norm is not None else x


def attention_mask(meta: StepMeta, causal: bool, cache: KVCache | None, window: int | None = None) -> torch.Tensor:
    """[B, 1, T, K] bool mask: valid keys, causal order, the sliding `window` (a query at cache column q sees
    columns q - window + 1 .. q; a sequence's tokens occupy consecutive columns), and each token always sees
    itself."""
    if cache is None:
        keys = meta.valid  # [B, K=T]
        t = meta.valid.shape[1]
        q_idx = torch.arange(t, device=keys.device).view(1, t, 1)
        k_idx = torch.arange(t, device=keys.device).view(1, 1, t)
    else:
        keys = cache.key_mask(meta)  # [B, K]
        q_idx = meta.write_index.unsqueeze(-1)  # [B, T, 1]
        k_idx = torch.arange(keys.shape[1], device=keys.device).view(1, 1, -1)
    allowed = keys.unsqueeze(1)
    if causal:
        allowed = allowed & (k_idx <= q_idx)
    if window is not None:
        allowed = allowed & (k_idx > q_idx - window)
    return (allowed | (k_idx == q_idx)).unsqueeze(1)


def window_valid(meta: StepMeta, cache: KVCache, window: int) -> torch.Tensor:
    """A decode step's cache validity [S, K] restricted to each sequence's sliding window: for the slot of row b,
    columns before ``write_index[b] - window + 1`` are excluded (other slots keep their validity). Device ops
    only (a scatter), so it runs inside a captured CUDA graph."""
    valid = cache.valid[:, : meta.kv_len]
    start = torch.zeros(valid.shape[0], dtype=torch.long, device=valid.device)
    start = start.scatter(0, meta.slots, meta.write_index[:, -1] + 1 - window)  # [S]
    cols = torch.arange(valid.shape[1], device=valid.device).view(1, -1)
    return valid & (cols >= start.view(-1, 1))


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state dict) computed by `eet_pipe.ops.linear`, which runs decode-sized
    inputs on GPU through the GEMV kernel; `forward` also takes the optional epilogue of `project`."""

    def forward(self, x: torch.Tensor, activation: str | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, activation, residual)


def project(linear: nn.Module, x: torch.Tensor, activation: str | None = None,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """``act(linear(x)) + residual`` with the activation and the residual add fused into the linear's kernel
    where it has one (`Linear`, `Int8Linear`). A module carrying forward hooks (the precision comparison
    tool, captures) is called on its own, so that its hooks see the plain projection, and the epilogue
    follows as separate ops -- the same values in fp32."""
    if linear._forward_hooks or linear._forward_pre_hooks:
        return ops.epilogue(linear(x), activation, residual)
    return linear.forward(x, activation, residual)


def gated_project(gate: nn.Module, up: nn.Module, x: torch.Tensor, kind: str) -> torch.Tensor:
    """``act(gate(x)) * up(x)`` through `ops.gated_linear` (one GEMV kernel for a decode step) when the two are
    `Linear` modules, or both int8 (`Int8Linear`: ``qweight`` and ``scale``), and carry no hooks; otherwise
    each module is called (so that hooks see its plain projection) and `ops.gated_activation` follows."""
    if not any(m._forward_hooks or m._forward_pre_hooks for m in (gate, up)):
        if isinstance(gate, Linear) and isinstance(up, Linear):
            return ops.gated_linear(x, gate.weight, up.weight, kind, gate.bias, up.bias)
        if all(hasattr(m, "qweight") and hasattr(m, "scale") for m in (gate, up)):
            return ops.gated_linear(x, gate.qweight, up.qweight, kind, gate.bias, up.bias, gate.scale, up.scale)
    return ops.gated_activation(gate(x), up(x), kind)


class Attention(nn.Module):
    """Fused q/k/v projection, optional per-head q/k norm, optional rotary, softmax attention (over the layer's
    sliding window, if any), output projection."""

    def __init__(self, cfg: ArchConfig, index: int) -> None:
        super().__init__()
        self.cfg, self.index = cfg, index
        self.window = cfg.window(index)
        self.norm = Norm(cfg)
        self.qkv = Linear(cfg.hidden_size, cfg.qkv_size, bias=cfg.qkv_bias)
        self.q_norm = Norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = Norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.out = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.out_bias)

    def qkv_proj(self, x: torch.Tensor) -> torch.Tensor:
        """The fused projection [B, T, (Hq + 2 Hkv) D], with q and k normalised per head when the config says so
        (before rotary, as HF Qwen3 does); the q/k norms see [B, T, heads, D]."""
        qkv = self.qkv(x)
        if self.q_norm is None:
            return qkv
        cfg = self.cfg
        b, t, _ = qkv.shape
        q, k, v = qkv.split([cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                             cfg.num_kv_heads * cfg.head_dim], dim=-1)
        q = self.q_norm(q.reshape(b, t, cfg.num_heads, cfg.head_dim)).reshape(b, t, -1)
        k = self.k_norm(k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)).reshape(b, t, -1)
        return torch.cat([q, k, v], dim=-1)

    def project(self, x: torch.Tensor, meta: StepMeta,
                rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        """q [B, Hq, T, D], k and v [B, Hkv, T, D] with rotary applied."""
        cfg = self.cfg
        b, t, _ = x.shape
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                             cfg.num_kv_heads * cfg.head_dim], dim=-1)
        q = q.view(b, t, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope[0][meta.positions], rope[1][meta.positions]  # [B, T, D]
            q, k = ops.rotary(q, cos, sin), ops.rotary(k, cos, sin)
        return q, k, v

    def forward(self, x: torch.Tensor, meta: StepMeta, mask: torch.Tensor | None, cache: KVCache | None,
                rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:  # x: [B, T, H] (normed)
        """`mask`: the [B, 1, T, K] attention mask of this layer's window, None for an unpadded cache-free
        forward; on a decode step (one token, with a cache) the [S, K] cache validity restricted to the window
        (`window_valid`), None for the cache's own."""
        if cache is None:
            q, k, v = self.project(x, meta, rope)
            o = ops.attention(q, k, v, mask, causal=self.cfg.causal)  # [B, Hq, T, D]
        else:
            o = self.cached(x, meta, mask, cache, rope)
        b, _, t, _ = o.shape
        return self.out(o.transpose(1, 2).reshape(b, t, -1))

    def cached(self, x: torch.Tensor, meta: StepMeta, mask: torch.Tensor | None, cache: KVCache,
               rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Attention with the KV cache: one fused op splits heads, applies rotary and writes k/v into the
        cache; decode steps (one token) use the decode-attention kernel (without rotary, straight from the
        projection: it stores the new k and v itself), prefill the SDPA path."""
        cfg, i = self.cfg, self.index
        k_len = meta.kv_len
        if x.shape[1] == 1 and rope is None:
            # a decode step without rotary: the attention kernel stores the new k and v itself (one kernel less)
            valid = mask if mask is not None else cache.valid[:, :k_len]
            return ops.decode_attention_qkv(self.qkv_proj(x), cache.k[i][:, :, :k_len], cache.v[i][:, :, :k_len],
                                            meta.slots, meta.write_index, meta.lengths_after_write(),
                                            valid, cfg.num_heads, cfg.num_kv_heads)
        cos, sin = rope if rope is not None else (None, None)
        q = ops.qkv_rotary_cache(self.qkv_proj(x), cos, sin, cache.k[i], cache.v[i], meta.slots, meta.write_index,
                                 cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rotary=rope is not None,
                                 positions=meta.positions)
        if x.shape[1] == 1:
            valid = mask if mask is not None else cache.valid[:, :k_len]
            return ops.decode_attention(q, cache.k[i][:, :, :k_len], cache.v[i][:, :, :k_len], meta.slots,
                                        meta.lengths_after_write(), valid)
        k, v = cache.read(i, meta)
        return ops.attention(q, k, v, mask)


class MLP(nn.Module):
    """up (+ gate) -> activation -> down."""

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.activation = cfg.activation
        self.norm = Norm(cfg)
        self.up = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.gate = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias) if cfg.gated else None
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """down(act(up(x))) [+ residual]; x: [B, T, H] (normed)."""
        if self.gate is not None:
            h = gated_project(self.gate, self.up, x, self.activation)
        else:
            h = project(self.up, x, self.activation)
        return project(self.down, h, residual=residual)


class TransformerLayer(nn.Module):
    """One block; pre-norm (GPT-2, LLaMA) or post-norm (BERT) by the config."""

    def __init__(self, cfg: ArchConfig, index: int) -> None:
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.attn = Attention(cfg, index)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, meta: StepMeta, mask: torch.Tensor | None, cache: KVCache | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if self.pre_norm:
            a = self.attn(self.attn.norm(x), meta, mask, cache, rope)
            normed, h = self.mlp.norm.residual(a, x)
            return self.mlp(normed, residual=h)
        a = self.attn(x, meta, mask, cache, rope)
        h, _ = self.attn.norm.residual(a, x)
        out, _ = self.mlp.norm.residual(self.mlp(h), h)
        return out


class LMHead(nn.Linear):
    """The vocabulary projection (no bias), optionally computed with a row-padded weight.

    A GEMM whose output width is odd (GPT-2's 50257) cannot use the aligned tensor-core kernels and
    runs several times slower. After `pad`, the weight lives in the first V rows of a zero-padded
    [ceil(V / multiple) * multiple, H] buffer: `weight` is a view of it (same shape, same state
    dict, no extra memory) and forward multiplies by the whole buffer and returns a view of the
    first V columns. Moving or casting the module drops the padding (call `pad` again after).
    """

    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__(hidden, vocab, bias=False)
        self.padded: torch.Tensor | None = None

    def pad(self, multiple: int = 64) -> None:
        vocab, hidden = self.weight.shape
        rows = math.ceil(vocab / multiple) * multiple
        if self.padded is not None or rows == vocab:
            return
        padded = torch.zeros(rows, hidden, dtype=self.weight.dtype, device=self.weight.device)
        padded[:vocab].copy_(self.weight.detach())
        self.weight = nn.Parameter(padded[:vocab], requires_grad=False)
        self.padded = padded

    def _apply(self, fn, recurse: bool = True):  # .to() / .half() give the weight new storage
        self.padded = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padded is not None and self.weight.data_ptr() != self.padded.data_ptr():
            self.padded = None  # the weight was replaced (e.g. load_state_dict(assign=True)): padding is stale
        if self.padded is None:
            return super().forward(x)
        return F.linear(x, self.padded)[..., : self.out_features]
