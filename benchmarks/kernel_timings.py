"""Decode-step kernels one at a time: our GEMV (dense fp16 and int8, with the fused epilogue) against
cuBLAS (`F.linear`, then the separate activation / residual ops) and the per-shape selected cuBLASLt GEMM
with its fused epilogue (`eet_pipe.ops.gemm_select`), int8 as dequantisation kernel + GEMM, and decode
attention, at the GPT-2 XL shapes. Each case is captured in a CUDA graph of `reps` calls and replayed, so the figure is
time per call without launch gaps from the host; the calls cycle through enough copies of the weights
(or caches) that they stream from memory, not from L2, as in a model whose layers each have their own.
"GB/s" is the bytes the op must read (weights, or K and V) over that time, to compare against the
memory bandwidth.

    python -m benchmarks.kernel_timings device=cuda:0 rows=1,4,8,16,64
    python -m benchmarks.kernel_timings --quick          # CPU smoke run (references, tiny shapes)
    ncu --kernel-name regex:gemv --launch-count 8 --section SpeedOfLight --section Occupancy \
        python -m benchmarks.kernel_timings ops=linear rows=1 reps=4      # one kernel under Nsight Compute

Writes <out>.json (one row per op x shape x rows) and <out>.png.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

from benchmarks.common import environment, kernel_setting, parse_args, save_figure, time_it, write_json
from eet_pipe import ops
from eet_pipe.ops.cuda_graphs import graphed

DEFAULTS = {"device": "cuda:0", "hidden": 1600, "heads": 25, "rows": ["1", "4", "8", "16"], "context": ["64", "512"],
            "attn_batches": ["1", "64"], "reps": 48, "stream_mib": 400, "ops": ["linear", "attention"],
            "out": "bench_results/kernels"}
QUICK = {"device": "cpu", "hidden": 64, "heads": 4, "rows": ["1", "4"], "context": ["16"], "attn_batches": ["1", "4"],
         "reps": 2, "stream_mib": 1}


GEMV_KERNEL_ROWS = 16
"""Most rows the GEMV kernel takes (csrc/gemv.cu); larger row counts time the GEMM paths only."""


def copies(tensors: tuple[torch.Tensor, ...], opts: dict) -> list[tuple[torch.Tensor, ...]]:
    """Enough copies of `tensors` to exceed `stream_mib` (and at most `reps`), so the timed calls read memory."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    n = max(1, min(opts["reps"], -(-opts["stream_mib"] * 2**20 // max(nbytes, 1))))
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(n - 1)]


def cycling(fn: Callable[..., object], sets: list[tuple[torch.Tensor, ...]]) -> Callable[[], object]:
    """A call that uses the next set of tensors each time (cycled)."""
    state = {"i": 0}

    def call() -> object:
        args = sets[state["i"] % len(sets)]
        state["i"] += 1
        return fn(*args)

    return call


def per_call_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Seconds per call: `reps` calls replayed as one CUDA graph (`graphed`; on CPU the calls themselves),
    median of 5 after one warm-up."""
    fn()  # outside the capture: workspaces and lazy initialisation
    batch = graphed(lambda: [fn() for _ in range(reps)], device)
    return time_it(batch, [str(device)], warmup=1, repeats=5) / reps


def linear_rows(opts: dict, device: torch.device, dtype: torch.dtype) -> list[dict]:
    h = opts["hidden"]
    shapes = {"attn.qkv": (3 * h, h), "attn.out": (h, h), "mlp.up": (4 * h, h), "mlp.down": (h, 4 * h)}
    rows = []
    for name, (n, k) in shapes.items():
        w = (torch.randn(n, k, device=device) * 0.02).to(dtype)
        bias = torch.randn(n, device=device).to(dtype)
        qweight, scale = ops.quantize_int8(w)
        dense, int8 = copies((w, bias), opts), copies((qweight, scale, bias), opts)
        act = "gelu_new" if name == "mlp.up" else None
        for m in (int(r) for r in opts["rows"]):
            x = torch.randn(m, k, device=device).to(dtype)
            residual = torch.randn(m, n, device=device).to(dtype) if name == "mlp.down" else None

            def dense_call(w: torch.Tensor, b: torch.Tensor, x=x, act=act, residual=residual) -> torch.Tensor:
                return ops.linear(x, w, b, act, residual)

            def gemv_call(w: torch.Tensor, b: torch.Tensor, x=x, act=act, residual=residual) -> torch.Tensor:
                if not (ops.HAVE_EXT and x.is_cuda):  # CPU smoke run: the reference
                    return ops.linear(x, w, b, act, residual)
                return torch.ops.eet_pipe.gemv(x, w, None, b, residual, act or "none")  # at every row count

            def int8_call(q: torch.Tensor, sc: torch.Tensor, b: torch.Tensor, x=x, act=act,
                          residual=residual) -> torch.Tensor:
                if not (ops.HAVE_EXT and x.is_cuda):
                    return ops.int8_linear(x, q, sc, b, act, residual)
                return torch.ops.eet_pipe.gemv(x, q, sc, b, residual, act or "none")  # at every row count <= 16

            def dequant_call(q: torch.Tensor, sc: torch.Tensor, b: torch.Tensor, x=x, act=act,
                             residual=residual) -> torch.Tensor:  # int8 above the GEMV's rows, at every row count
                return ops.linear(x, ops.dequantize_int8(q, sc, x.dtype), b, act, residual)

            w_bytes, q_bytes = w.numel() * w.element_size(), qweight.numel() + scale.numel() * scale.element_size()
            cases = {  # system: (gemv, gemm selection, call, bytes the op must read)
                "F.linear": (False, False, cycling(dense_call, dense), w_bytes),  # cuBLAS + separate epilogue ops
                "cuBLASLt selected": (False, True, cycling(dense_call, dense), w_bytes),  # gemm_select, fused
                "gemv": (None, None, cycling(gemv_call, dense), w_bytes),
                "int8 gemv": (None, None, cycling(int8_call, int8), q_bytes),
                "int8 dequant+GEMM": (None, True, cycling(dequant_call, int8), q_bytes)}
            if m > GEMV_KERNEL_ROWS:  # the GEMV kernel's limit
                del cases["gemv"], cases["int8 gemv"]
            for system, (gemv, select, fn, nbytes) in cases.items():
                with kernel_setting(gemv=gemv, select=select):
                    s = per_call_seconds(fn, device, opts["reps"])
                rows.append({"op": name, "system": system, "rows": m, "n": n, "k": k,
                             "epilogue": "+".join(e for e in ("bias", act, "residual" if residual is not None
                                                                         else None) if e),
                             "us": s * 1e6, "gb_per_s": nbytes / s / 1e9})
    return rows


def attention_rows(opts: dict, device: torch.device, dtype: torch.dtype) -> list[dict]:
    heads, d = opts["heads"], opts["hidden"] // opts["heads"]
    rows = []
    for b in (int(x) for x in opts["attn_batches"]):
        for ctx in (int(x) for x in opts["context"]):
            q = torch.randn(b, heads, 1, d, device=device).to(dtype)
            k_cache = torch.randn(b, heads, ctx, d, device=device).to(dtype)
            v_cache = torch.randn(b, heads, ctx, d, device=device).to(dtype)
            slots = torch.arange(b, device=device)
            lengths = torch.full((b,), ctx, device=device)
            valid = torch.ones(b, ctx, dtype=torch.bool, device=device)
            nbytes = 2 * k_cache.numel() * k_cache.element_size()
            caches = copies((k_cache, v_cache), opts)
            cases = {"eet_pipe decode_attention": cycling(
                         lambda k, v: ops.decode_attention(q, k, v, slots, lengths, valid), caches),
                     "SDPA": cycling(lambda k, v: F.scaled_dot_product_attention(q, k, v), caches)}
            for system, fn in cases.items():
                s = per_call_seconds(fn, device, opts["reps"])
                rows.append({"op": "decode_attention", "system": system, "rows": b, "context": ctx, "us": s * 1e6,
                             "gb_per_s": nbytes / s / 1e9})
    return rows


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    labels = [f"{r['op']} {r['rows']}{' ctx' + str(r['context']) if 'context' in r else ''}\n{r['system']}"
              for r in rows]
    ax.bar(range(len(rows)), [r["gb_per_s"] for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=5)
    ax.set_ylabel("GB/s of bytes read")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def main() -> None:
    opts = parse_args(DEFAULTS, QUICK)
    device = torch.device(opts["device"])
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.set_device(device)
    unknown = set(opts["ops"]) - {"linear", "attention"}
    if unknown:
        raise SystemExit(f"ops={','.join(sorted(unknown))} unknown; choose from linear, attention")
    rows = (linear_rows(opts, device, dtype) if "linear" in opts["ops"] else []) + \
        (attention_rows(opts, device, dtype) if "attention" in opts["ops"] else [])
    data = {"env": environment(), "config": opts, "kernels": ops.HAVE_EXT and device.type == "cuda", "results": rows}
    write_json(Path(opts["out"] + ".json"), data)
    plot(rows, opts["out"] + ".png", f"decode kernels, hidden {opts['hidden']}, {dtype}, {device}")
    print(f"{'op':<18} {'system':<26} {'rows':>4} {'ctx':>5} {'us':>9} {'GB/s':>8}")
    for r in rows:
        print(f"{r['op']:<18} {r['system']:<26} {r['rows']:>4} {r.get('context', ''):>5} {r['us']:>9.2f} "
              f"{r['gb_per_s']:>8.0f}")


if __name__ == "__main__":
    main()
