"""Peer for benchmarks/single_gpu.py: a plain-PyTorch decoder with a static KV cache, written as a user of
gpt-fast would write it, for GPT-2 (LayerNorm, learned positions, tanh GELU, tied head) and LLaMA-family
models (RMSNorm, rotary with default / linear / llama3 scaling, SwiGLU, grouped-query attention, untied
head; q/k/v biases as in Qwen2), built over eet_pipe's canonical weights without copying them.

- One `KVCache` module per layer, buffers [batch, kv_heads, max_seq, head_dim]; a step writes its keys and
  values with `index_copy_` at `input_pos`, in place. (One [layers, batch, ...] buffer written through
  `cache[i, :, :, pos] = k` instead makes the compiled step copy each layer's whole cache slab out of place,
  several times, and write the whole cache back at the end: traffic growing with batch x max_seq.)
- Decode: one token per sequence, attention over the whole cache with a boolean mask `key <= input_pos`;
  grouped-query attention folds a kv head's query heads into the query rows (no repeated keys); the greedy
  argmax is inside the step. The step is compiled with `torch.compile(mode="reduce-overhead",
  fullgraph=True, dynamic=False)` (CUDA graphs by the compiler, static shapes per batch size) and runs with
  SDPA's math backend, which inductor fuses (gpt-fast's setting), in the cache's precision.
- Prefill: positions 0..T-1, causal SDPA over the prompt's own keys (flash attention on GPU), keys and
  values written to the cache, logits of the last token only; eager or compiled (static shapes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from eet_pipe.models.config import ArchConfig

__all__ = ["StaticCacheLM", "build_peer", "compile_steps", "greedy_generate", "rope_inv_frequencies"]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "relu": F.relu,
    "silu_gated": F.silu, "gelu_gated": lambda x: F.gelu(x, approximate="tanh")}


class Norm(nn.Module):
    """LayerNorm, or RMSNorm computed in fp32 (as LLaMA's reference does)."""

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.rms, self.eps = cfg.norm == "rmsnorm", cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.hidden_size))
        self.bias = nn.Parameter(torch.zeros(cfg.hidden_size)) if not self.rms and cfg.norm_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rms:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class KVCache(nn.Module):
    """One layer's keys and values, [batch, kv_heads, max_seq, head_dim] each."""

    def __init__(self, batch: int, kv_heads: int, max_seq: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        shape = (batch, kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, D] at sequence positions `pos` [T], in place; the whole cache back."""
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding in fp32. x [B, T, H, D]; cos, sin [T, D]."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.norm = Norm(cfg)
        self.qkv = nn.Linear(cfg.hidden_size, cfg.qkv_size, bias=cfg.qkv_bias)
        self.out = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.out_bias)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, pos: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, hidden] (normed); `mask` None: prefill from position 0, else decode (T = 1)."""
        b, t, _ = x.shape
        hq, hkv, d = self.heads, self.kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.view(b, t, hq, d), k.view(b, t, hkv, d), v.view(b, t, hkv, d)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        k_all, v_all = self.cache.update(pos, k.transpose(1, 2), v.transpose(1, 2))
        if mask is None:  # prefill: the prompt's own keys, causal (flash attention on GPU)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            if hkv != hq:
                k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True)
            return self.out(o.transpose(1, 2).reshape(b, t, hq * d))
        # decode: each kv head's query heads are rows of one query block against its keys (no key copies)
        o = F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, d), k_all, v_all, attn_mask=mask)
        return self.out(o.reshape(b, 1, hq * d))


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.norm = Norm(cfg)
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias) if cfg.gated else None
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.attn, self.mlp = Attention(cfg), MLP(cfg)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.attn.norm(x), pos, rope, mask)
        return x + self.mlp(self.mlp.norm(x))


class Embed(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = nn.Embedding(cfg.max_positions, cfg.hidden_size) if cfg.positions == "learned" else None


class Head(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))


def rope_inv_frequencies(cfg: ArchConfig) -> torch.Tensor:
    """Rotary inverse frequencies [D/2] (fp32) with the config's scaling: default, linear or llama3."""
    d = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    if cfg.rope_type == "linear":
        return inv / cfg.rope_factor
    if cfg.rope_type != "llama3":
        return inv
    old = cfg.rope_original_max_positions
    low_wavelen, high_wavelen = old / cfg.rope_low_freq_factor, old / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / cfg.rope_factor, inv)
    smooth = (old / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(mid, (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled, scaled)


class StaticCacheLM(nn.Module):
    """The decoder; module names are eet_pipe's canonical names, so the canonical state dict loads as is."""

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        if not (cfg.is_decoder and cfg.pre_norm and cfg.final_norm) or cfg.type_vocab_size or cfg.embed_norm:
            raise ValueError(f"the static-cache peer runs pre-norm decoders (GPT-2, LLaMA family); {cfg.model_type!r} "
                             "is not one (causal, lm_head, pre_norm, final_norm, no token types or embedding norm)")
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = Norm(cfg)
        self.head = Head(cfg)
        self.batch = self.max_seq = 0

    def setup_caches(self, batch: int, max_seq: int) -> None:
        """Fresh zeroed caches for `batch` sequences of at most `max_seq` tokens (rounded up to 8), and the
        rotary tables for those positions."""
        max_seq = -(-max_seq // 8) * 8
        if max_seq > self.cfg.max_positions and self.cfg.positions == "learned":
            raise ValueError(f"max_seq={max_seq} exceeds the model's {self.cfg.max_positions} learned positions")
        ref = self.head.weight
        for layer in self.layers:
            layer.attn.cache = KVCache(batch, self.cfg.num_kv_heads, max_seq, self.cfg.head_dim, ref.dtype, ref.device)
        self.register_buffer("key_index", torch.arange(max_seq, device=ref.device), persistent=False)
        if self.cfg.positions == "rotary":
            freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32), rope_inv_frequencies(self.cfg))
            emb = torch.cat((freqs, freqs), dim=-1).to(ref.device)
            self.register_buffer("rope_cos", emb.cos(), persistent=False)
            self.register_buffer("rope_sin", emb.sin(), persistent=False)
        self.batch, self.max_seq = batch, max_seq

    def _run(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.embed.tok(ids)
        if self.embed.pos is not None:
            x = x + self.embed.pos(pos)
        rope = (self.rope_cos[pos], self.rope_sin[pos]) if self.cfg.positions == "rotary" else None
        for layer in self.layers:
            x = layer(x, pos, rope, mask)
        return F.linear(self.final_norm(x[:, -1]), self.head.weight)  # [B, V], last token only

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Prompt ids [B, T] at positions 0..T-1 into the cache -> the greedy next ids [B, 1]."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self._run(ids, pos, None).argmax(-1, keepdim=True)

    def decode(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One step: ids [B, 1] at position `pos` [1] (a device tensor) -> the greedy next ids [B, 1]."""
        mask = (self.key_index <= pos).view(1, 1, 1, -1)
        return self._run(ids, pos, mask).argmax(-1, keepdim=True)


def build_peer(cfg: ArchConfig, state: dict[str, torch.Tensor]) -> StaticCacheLM:
    """The peer over the canonical tensors `state` (shared, not copied; the LM head's first `vocab_size` rows
    where eet_pipe padded it); a tied head is the token embedding's Parameter."""
    with torch.device("meta"):
        model = StaticCacheLM(cfg)
    wanted = dict(model.state_dict())
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ValueError(f"canonical state lacks {len(missing)} tensor(s) the peer needs: {', '.join(missing[:8])}")
    tensors = {k: state[k][: cfg.vocab_size] if k in ("head.weight", "embed.tok.weight") else state[k] for k in wanted}
    model.load_state_dict(tensors, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.head.weight = model.embed.tok.weight
    return model.eval().requires_grad_(False)


Step = Callable[..., torch.Tensor]


def compile_steps(model: StaticCacheLM, prefill: bool = True) -> tuple[Step, Step]:
    """(prefill, decode) of `model` under torch.compile as gpt-fast sets it up: the decode step with
    mode="reduce-overhead" and fullgraph (CUDA graphs), prefill (if `prefill`, else eager) with static shapes
    and no CUDA graphs; both compile on their first call at each shape."""
    import torch._inductor.config as inductor

    inductor.coordinate_descent_tuning = True  # gpt-fast's setting: tunes the generated kernels' launch shapes
    decode = torch.compile(model.decode, mode="reduce-overhead", fullgraph=True, dynamic=False)
    return (torch.compile(model.prefill, fullgraph=True, dynamic=False) if prefill else model.prefill), decode


@torch.no_grad()
def greedy_generate(model: StaticCacheLM, ids: torch.Tensor, new_tokens: int, prefill: Step | None = None,
                    decode: Step | None = None) -> torch.Tensor:
    """`new_tokens` greedy tokens [B, new_tokens] after the prompts `ids` [B, T] (all of length T, into the
    caches set up for B sequences of at least T + new_tokens - 1 positions). The tokens stay on the device until the end
    (no host round trip per step); `prefill` / `decode` default to the model's eager methods."""
    b, t = ids.shape
    if b != model.batch or t + new_tokens - 1 > model.max_seq:  # the last token is never written
        raise ValueError(f"prompts [{b}, {t}] + {new_tokens} new tokens do not fit the caches set up for batch "
                         f"{model.batch} x {model.max_seq} positions; call setup_caches first")
    prefill, decode = prefill or model.prefill, decode or model.decode
    nxt = prefill(ids)
    out = [nxt.clone()]
    pos = torch.tensor([t], device=ids.device)
    with _decode_attention_backend(ids.device):
        for _ in range(new_tokens - 1):
            nxt = decode(nxt, pos).clone()  # the compiled step's output buffer is reused by its next replay
            pos += 1
            out.append(nxt)
    return torch.cat(out, dim=1)


@contextmanager
def _decode_attention_backend(device: torch.device) -> Iterator[None]:
    """On GPU: SDPA's math backend, which inductor turns into its own kernels (gpt-fast's setting), with fp16 /
    bf16 reductions allowed so that it does not first copy the whole cache to fp32 (the math backend's default
    on CUDA); both are read when the step compiles."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    saved = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(saved)
