"""The device's limits measured in the benchmark's own run, and the model's bytes and FLOPs against them:
a decode step cannot beat streaming the weights at the measured copy bandwidth, a prefill cannot beat the
measured matmul peak."""

from __future__ import annotations

from typing import Any

import torch

from eet_pipe.models.config import ArchConfig

__all__ = ["copy_bandwidth", "matmul_peak", "weight_bytes", "prefill_flops", "device_limits"]

_LINEARS = ("attn.qkv.weight", "attn.out.weight", "mlp.up.weight", "mlp.gate.weight", "mlp.down.weight")


def _time_ms(fn: Any, device: torch.device, repeats: int) -> float:
    """Median milliseconds of `fn` by CUDA events, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device, nbytes: int = 2**30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the read and the write (2 x `nbytes` per copy)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / (ms * 1e-3)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of a square `size` matmul in `dtype` (cuBLAS): the attainable peak the prefill is held to."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    ms = _time_ms(lambda: torch.matmul(a, b, out=out), device, repeats)
    return 2 * size**3 / (ms * 1e-3)


def _shapes(cfg: ArchConfig) -> dict[str, tuple[int, ...]]:
    from eet_pipe.models.model import CanonicalModel

    with torch.device("meta"):
        model = CanonicalModel(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def weight_bytes(cfg: ArchConfig, itemsize: int) -> dict[str, int]:
    """'all': every weight once (a tied head counted once); 'streamed': what one decode step must read, i.e.
    all but the embedding tables of which a step reads only its tokens' rows (a tied table is the head)."""
    shapes = _shapes(cfg)
    numel = {k: int(torch.Size(s).numel()) for k, s in shapes.items()}
    total = sum(numel.values()) - (numel.get("head.weight", 0) if cfg.tie_embeddings else 0)
    tables = numel.get("embed.pos.weight", 0) + (0 if cfg.tie_embeddings else numel.get("embed.tok.weight", 0))
    return {"all": total * itemsize, "streamed": (total - tables) * itemsize}


def prefill_flops(cfg: ArchConfig, batch: int, seq: int, logits_rows: int) -> float:
    """Matmul FLOPs of one prefill of [batch, seq] from position 0: the layers' projections, causal attention
    (the half of QK^T and PV under the mask) and the head for `logits_rows` tokens per sequence."""
    shapes = _shapes(cfg)
    linear = sum(torch.Size(s).numel() for k, s in shapes.items() if k.startswith("layers.") and k.endswith(_LINEARS))
    attention = 2 * cfg.num_layers * batch * cfg.num_heads * seq * seq * cfg.head_dim  # 4 * b*h*s^2*d / 2
    head = 2 * batch * logits_rows * cfg.vocab_size * cfg.hidden_size
    return 2.0 * batch * seq * linear + attention + head


def device_limits(device: str, dtype: torch.dtype, cfg: ArchConfig) -> dict[str, Any]:
    """The run's measured copy bandwidth and matmul peak, the model's weight bytes and the decode floors
    (bytes / bandwidth); CPU runs record only the bytes."""
    nbytes = weight_bytes(cfg, torch.tensor([], dtype=dtype).element_size())
    out: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "weight_bytes": nbytes["all"],
                           "streamed_weight_bytes": nbytes["streamed"]}
    dev = torch.device(device)
    if dev.type != "cuda":
        return out
    bw = copy_bandwidth(dev)
    out.update(copy_bytes_per_s=bw, matmul_peak_flops=matmul_peak(dev, dtype),
               floor_ms=nbytes["all"] / bw * 1e3, streamed_floor_ms=nbytes["streamed"] / bw * 1e3)
    torch.cuda.empty_cache()
    return out
