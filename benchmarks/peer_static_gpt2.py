"""Peer for benchmarks/single_gpu.py: a plain-PyTorch GPT-2 with a static KV cache held as module
buffers (gpt-fast style), loading eet_pipe's canonical GPT-2 weights, decode step under
``torch.compile(mode="reduce-overhead")`` (CUDA graphs by the compiler). Every sequence of a
batch has the same length (no padding), which is what the benchmark runs.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

__all__ = ["StaticGPT2", "run_peer", "prefill_seconds"]


class StaticGPT2(nn.Module):
    """GPT-2 (pre-norm, tanh GELU, learned positions, tied head) over canonical tensors."""

    def __init__(self, state: dict[str, torch.Tensor], cfg: Any, batch: int, max_len: int) -> None:
        super().__init__()
        self.cfg, self.eps = cfg, cfg.norm_eps
        self.w = {k: v for k, v in state.items()}  # canonical name -> tensor (on the target device)
        ref = state["embed.tok.weight"]
        shape = (cfg.num_layers, batch, cfg.num_heads, max_len, cfg.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=ref.dtype, device=ref.device))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=ref.dtype, device=ref.device))
        causal = torch.ones(max_len, max_len, dtype=torch.bool, device=ref.device).tril()
        self.register_buffer("causal", causal)

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    def _lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w.get(f"{name}.bias"))

    def _attn(self, i: int, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h, d = self.cfg.num_heads, self.cfg.head_dim
        q, k, v = self._lin(x, f"layers.{i}.attn.qkv").view(b, t, 3, h, d).permute(2, 0, 3, 1, 4)
        self.k_cache[i, :, :, pos] = k  # [B, H, T, D] into columns pos
        self.v_cache[i, :, :, pos] = v
        mask = self.causal[pos].view(1, 1, t, -1)  # [1, 1, T, max_len]
        o = F.scaled_dot_product_attention(q, self.k_cache[i], self.v_cache[i], attn_mask=mask)
        return self._lin(o.transpose(1, 2).reshape(b, t, h * d), f"layers.{i}.attn.out")

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids [B, T], pos [T] (cache columns = positions) -> logits of the last token [B, V]."""
        x = F.embedding(ids, self.w["embed.tok.weight"]) + F.embedding(pos, self.w["embed.pos.weight"])
        for i in range(self.cfg.num_layers):
            x = x + self._attn(i, self._ln(x, f"layers.{i}.attn.norm"), pos)
            hid = F.gelu(self._lin(self._ln(x, f"layers.{i}.mlp.norm"), f"layers.{i}.mlp.up"), approximate="tanh")
            x = x + self._lin(hid, f"layers.{i}.mlp.down")
        x = self._ln(x[:, -1], "final_norm")
        return F.linear(x, self.w["embed.tok.weight"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def run_peer(state: dict[str, torch.Tensor], cfg: Any, batch: int, prompt_len: int, new_tokens: int,
             compile_decode: bool) -> dict[str, float]:
    """Prefill a random prompt, then time `new_tokens` greedy decode steps.

    Returns compile_s (first decode calls, when compiled), prefill_s and ms_per_step.
    """
    device = state["embed.tok.weight"].device
    model = StaticGPT2(state, cfg, batch, prompt_len + new_tokens + 3)
    decode = torch.compile(model, mode="reduce-overhead", fullgraph=True) if compile_decode else model
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=device)
    start = time.perf_counter()
    nxt = model(ids, torch.arange(prompt_len, device=device)).argmax(-1, keepdim=True)
    _sync(device)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for n in range(3):  # compile + cudagraph recording (reduce-overhead records on the 2nd/3rd call)
        decode(nxt, torch.tensor([prompt_len + n], device=device))
    _sync(device)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for n in range(new_tokens):
        pos = torch.tensor([prompt_len + n], device=device)
        nxt = decode(nxt, pos).argmax(-1, keepdim=True)
        nxt.cpu()  # the next step needs the sampled token, as in a serving loop
    _sync(device)
    ms = (time.perf_counter() - start) / new_tokens * 1e3
    return {"compile_s": compile_s if compile_decode else 0.0, "prefill_s": prefill_s, "ms_per_step": ms}


def prefill_seconds(state: dict[str, torch.Tensor], cfg: Any, batch: int, seq: int, repeats: int) -> float:
    """Median seconds of an eager prefill of [batch, seq] into a fresh static cache."""
    device = state["embed.tok.weight"].device
    model = StaticGPT2(state, cfg, batch, seq)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    pos = torch.arange(seq, device=device)
    times = []
    with torch.inference_mode():
        for n in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            model(ids, pos)
            _sync(device)
            if n:
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
