"""One GPU, one run: eet_pipe fp16 / bf16 / int8 (CUDA graphs + GEMM tuning) and fp16 eager, against
HF transformers (eager + SDPA) and a plain-PyTorch static-cache model under torch.compile (gpt-fast style,
`benchmarks/peer_static.py`), all on the same canonical weights. GPT-2 and LLaMA-family models.

    python -m benchmarks.single_gpu model=gpt2-xl weights=random device=cuda:0
    python -m benchmarks.single_gpu model=llama-3-8b weights=random dtype=bf16 systems=hf,static,bf16 tune=no \
        batches=1,64 prefill=8x2048
    python -m benchmarks.single_gpu --quick out=/tmp/x      # CPU smoke run (tiny, batch 1/2, 8 tokens)
    python -m benchmarks.single_gpu systems=hf,static,fp16,int8 tune=no     # a subset, no GEMM tuning

`dtype` is the peers' precision (HF and the static-cache model; fp32 on CPU); our systems carry theirs in
their names. Decode: ms per step at each batch (prompt `prompt` tokens, `new_tokens` greedy steps, EOS
ignored), from (time of generate(new_tokens) - time of generate(1)) / (new_tokens - 1), for every system.
The static-cache peer compiles its decode step per batch size (static shapes; `compile_s` in its rows is that
first call) and prefills eagerly, or compiled per shape with `static_prefill=compile`. Prefill: tokens/s of one
forward over [batch, seq] (ours and HF: logits of every token; the peer: the KV-cache write and the last
token's logits, as its generation runs it). On GPU the run also measures the device's copy bandwidth and bf16 /
fp16 matmul peak ("limits" in the JSON, `benchmarks/roofline.py`): each decode row gets `floor_ratio` (ms per
step over the weights' bytes / copy bandwidth) and each prefill row `flops_per_s` and `peak_fraction`.
Peak memory: torch.cuda.max_memory_allocated per system. Decode-sized GEMMs run
cuBLASLt with a per-shape selected algorithm in every eet_pipe system (`eet_pipe.ops.gemm_select`); `fp16plain`
is fp16 with them on F.linear instead, and the JSON's "gemm_select" lists each shape's winner and F.linear's
time. `tune=yes` asks for GEMM tuning (the selection's results file on CUDA, TunableOp on ROCm) in every
eet_pipe system and `fp16tuned` always asks; a tuned system turns it off again when it is done. A failing
system records its error.
Writes <out>.json (env, config, limits, rows) and <out>.png.
"""

from __future__ import annotations

import gc
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import eet_pipe
from benchmarks.common import environment, kernel_setting, parse_args, save_figure, sync, time_it, write_json
from benchmarks.peer_static import build_peer, compile_steps, greedy_generate
from benchmarks.peers import hf_from_canonical
from benchmarks.roofline import device_limits, prefill_flops
from eet_pipe.loading import presets, units
from eet_pipe.models.dtypes import parse_dtype
from eet_pipe.models.meta import prefill_meta
from eet_pipe.ops import gemm_tuning

DEFAULTS = {"model": "gpt2-xl", "weights": "random", "dtype": "fp16", "static_prefill": "eager", "device": "cuda:0",
            "batches": ["1", "16", "64"],
            "prompt": 32, "new_tokens": 128, "prefill": ["1x512", "8x512", "32x512"], "repeats": 3,
            "gemm_cache": "bench_results/gemm_tuning", "out": "bench_results/single_gpu",
            "systems": ["eager", "hf", "static", "fp16", "fp16cublas", "fp16serial", "bf16", "int8"], "tune": "yes"}
QUICK = {"model": "tiny", "weights": "", "dtype": "fp32", "device": "cpu", "batches": ["1", "2"], "prompt": 16,
         "new_tokens": 8, "prefill": ["1x64", "2x64"], "repeats": 1}
FIELDS = ("system", "phase", "dtype", "batch", "seq", "new_tokens", "ms_per_step", "tokens_per_s", "seconds",
          "peak_mem_bytes", "cuda_graphs", "gemm_tuning", "compile_s", "logits", "floor_ratio", "flops_per_s",
          "peak_fraction", "error")


def row(system: str, phase: str, **values: Any) -> dict[str, Any]:
    """A result row with every field (None where it does not apply)."""
    out = dict.fromkeys(FIELDS)
    out.update(system=system, phase=phase, **values)
    return out


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: str) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None


def _shapes(opts: dict) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in opts["prefill"]]


def measure(system: str, opts: dict, decode: Callable[[int, int], None] | None,
            prefill: Callable[[int, int], None], extra: dict) -> list[dict]:
    """Decode ms/step per batch and prefill tokens/s per shape of one system."""
    rows, dev, steps = [], opts["device"], opts["new_tokens"]
    for b in [int(x) for x in opts["batches"]]:
        _reset_peak(dev)
        full = time_it(lambda b=b: decode(b, steps), [dev], 1, opts["repeats"])
        one = time_it(lambda b=b: decode(b, 1), [dev], 1, opts["repeats"])
        ms = (full - one) / max(steps - 1, 1) * 1e3
        ms = ms if ms > 0 else None  # the difference of two medians lost in noise (tiny CPU runs): not a figure
        rows.append(row(system, "decode", batch=b, seq=opts["prompt"], new_tokens=steps, ms_per_step=ms,
                        tokens_per_s=b * 1e3 / ms if ms else None, seconds=full, peak_mem_bytes=_peak(dev),
                        **extra))
    for b, s in _shapes(opts):
        _reset_peak(dev)
        sec = time_it(lambda b=b, s=s: prefill(b, s), [dev], 1, opts["repeats"])
        rows.append(row(system, "prefill", batch=b, seq=s, tokens_per_s=b * s / sec, seconds=sec,
                        peak_mem_bytes=_peak(dev), **extra))
    return rows


def _ids(cfg: Any, b: int, s: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(b * 7919 + s))


def ours(opts: dict, dtype: str, graphs: bool, tune: bool, gemv: bool | None = None,
         pdl: bool | None = None, select: bool | None = None) -> list[dict]:
    """Our engine; `gemv` True / False forces the GEMV kernel for decode-sized dense linears on / off for this
    run, `pdl` programmatic dependent launch, `select` the per-shape cuBLASLt GEMMs (None: the library's
    settings, `EET_PIPE_GEMV`, `EET_PIPE_PDL`, `EET_PIPE_GEMM_SELECT`)."""
    with kernel_setting(gemv=gemv, pdl=pdl, select=select):
        return _ours(opts, dtype, graphs, tune, eet_pipe.ops.GEMV_ENABLED, pdl_in_effect(opts["device"]),
                     eet_pipe.ops.gemm_select.ENABLED and eet_pipe.ops.HAVE_EXT)


def pdl_in_effect(device: str) -> bool:
    """Whether our kernels on `device` launch with programmatic dependent launch: the setting, the kernels
    and an sm_90+ GPU (the library also requires compute_90 code, which this suite's builds have)."""
    dev = torch.device(device)
    return (eet_pipe.ops.set_pdl(None) and eet_pipe.ops.HAVE_EXT and dev.type == "cuda"
            and torch.cuda.get_device_capability(dev)[0] >= 9)


def _ours(opts: dict, dtype: str, graphs: bool, tune: bool, gemv: bool, pdl: bool, select: bool) -> list[dict]:
    lm = eet_pipe.from_pretrained(opts["model"], weights=opts["weights"] or None, dtype=dtype,
                                  device=opts["device"])
    try:
        if tune:
            lm.gemm_tuning = gemm_tuning.enable_gemm_tuning(lm.device, opts["gemm_cache"])
            lm.warm_up([int(b) for b in opts["batches"]], opts["prompt"])  # the shapes measured below

        def decode(b: int, steps: int) -> None:
            lm.generate(_ids(lm.cfg, b, opts["prompt"]), max_new_tokens=steps, ignore_eos=True, cuda_graphs=graphs)

        def prefill(b: int, s: int) -> None:
            with torch.inference_mode():
                lm.model(_ids(lm.cfg, b, s).to(lm.device),
                         prefill_meta(torch.ones(b, s, dtype=torch.bool)).to(lm.device))

        tuned = lm.gemm_tuning is not None and lm.gemm_tuning.enabled  # off without the extension or selection
        name = f"eet_pipe {dtype}" + (" graphs" if graphs else " eager") + \
            (" +tuning" if tuned else " (tuning unavailable)" if tune else "") + \
            ("" if dtype == "int8" else " +gemv" if gemv else " cuBLAS") + ("" if pdl else " serial launch") + \
            ("" if select or lm.device.type != "cuda" else " F.linear GEMMs")
        return measure(name, opts, decode, prefill, {"dtype": dtype, "cuda_graphs": graphs, "gemm_tuning": tuned,
                                                     "gemv": gemv, "pdl": pdl, "gemm_select": select})
    finally:
        if lm.gemm_tuning is not None:  # TunableOp is process-wide: the systems after this one run untuned
            gemm_tuning.disable_gemm_tuning(lm.gemm_tuning)


def peer_dtype(opts: dict) -> torch.dtype:
    """The peers' precision: `dtype` on GPU, fp32 on CPU."""
    return parse_dtype(opts["dtype"]) if opts["device"].startswith("cuda") else torch.float32


def canonical_weights(opts: dict) -> tuple[Any, dict[str, torch.Tensor]]:
    """The config and canonical tensors (on the device, in the peers' dtype) that every system runs."""
    spec = presets.resolve_model(opts["model"], opts["weights"] or None)
    model = units.load_units(spec, None, peer_dtype(opts), opts["device"])
    return spec.cfg, dict(model.state_dict())


def hf_sdpa(opts: dict) -> list[dict]:
    cfg, state = canonical_weights(opts)
    hf = hf_from_canonical(cfg, state, peer_dtype(opts), opts["device"])
    del state  # the HF model holds what it needs

    def decode(b: int, steps: int) -> None:
        with torch.inference_mode():
            hf.generate(_ids(cfg, b, opts["prompt"]).to(opts["device"]), max_new_tokens=steps, min_new_tokens=steps,
                        do_sample=False, pad_token_id=0, attention_mask=torch.ones(b, opts["prompt"], dtype=torch.long,
                                                                                   device=opts["device"]))

    def prefill(b: int, s: int) -> None:
        with torch.inference_mode():
            hf(_ids(cfg, b, s).to(opts["device"]), use_cache=False)

    return measure("HF transformers eager+SDPA", opts, decode, prefill,
                   {"dtype": str(hf.dtype).removeprefix("torch."), "cuda_graphs": False, "gemm_tuning": False})


class StaticRunner:
    """The static-cache peer at one shape at a time: caches set up and steps compiled (static shapes) on the
    first call at each batch / prefill shape, whose wall time is that shape's `compile_s`."""

    def __init__(self, opts: dict) -> None:
        self.opts, self.compiled = opts, not opts.get("quick")
        self.cfg, state = canonical_weights(opts)
        self.model = build_peer(self.cfg, state)
        self.shape: tuple[str, int, int] | None = None
        self.steps: tuple[Any, Any] = (self.model.prefill, self.model.decode)
        self.compile_s: dict[tuple[str, int, int], float] = {}

    def _setup(self, key: tuple[str, int, int], max_seq: int) -> None:
        if self.shape == key:
            return
        torch._dynamo.reset()  # frees the previous shape's graphs; this shape's first call compiles afresh
        self.model.setup_caches(key[1], max_seq)
        self.shape, start = key, time.perf_counter()
        if self.compiled:
            # the decode rows' prefill cancels out of their ms per step: eager there
            self.steps = compile_steps(self.model, prefill=key[0] == "prefill" and self.opts["static_prefill"] == "compile")
            self._run(key[1], key[2], 4 if key[0] == "decode" else 1)  # decode: compile, warm-up, graph record
            sync([self.opts["device"]])
        self.compile_s[key] = time.perf_counter() - start if self.compiled else 0.0

    def _run(self, b: int, s: int, steps: int) -> None:
        greedy_generate(self.model, _ids(self.cfg, b, s).to(self.opts["device"]), steps, *self.steps)

    def decode(self, b: int, steps: int) -> None:
        self._setup(("decode", b, self.opts["prompt"]), self.opts["prompt"] + self.opts["new_tokens"])
        self._run(b, self.opts["prompt"], steps)

    def prefill(self, b: int, s: int) -> None:
        self._setup(("prefill", b, s), s)
        self._run(b, s, 1)


def static_peer(opts: dict) -> list[dict]:
    runner = StaticRunner(opts)
    prefill_mode = "compiled" if opts["static_prefill"] == "compile" else "eager"
    name = ("plain PyTorch static cache + torch.compile(reduce-overhead)" + f", {prefill_mode} prefill"
            if runner.compiled else "plain PyTorch static cache (eager, --quick)")
    try:
        rows = measure(name, opts, runner.decode, runner.prefill,
                       {"dtype": str(peer_dtype(opts)).removeprefix("torch."), "gemm_tuning": False})
    finally:
        torch._dynamo.reset()
    for r in rows:
        key = (r["phase"], r["batch"], r["seq"])
        r.update(compile_s=runner.compile_s.get(key), logits="last" if r["phase"] == "prefill" else None,
                 cuda_graphs=runner.compiled and r["phase"] == "decode")
    return rows


def add_limits(rows: list[dict], limits: dict[str, Any], cfg: Any) -> None:
    """Each decode row's ms over the bandwidth floor, each prefill row's FLOP/s and fraction of the matmul peak."""
    for r in rows:
        if r["error"] or "copy_bytes_per_s" not in limits:
            continue
        if r["phase"] == "decode" and r["ms_per_step"]:
            r["floor_ratio"] = r["ms_per_step"] / limits["floor_ms"]
        elif r["phase"] == "prefill":
            logits = r["logits"] or "all"
            flops = prefill_flops(cfg, r["batch"], r["seq"], 1 if logits == "last" else r["seq"])
            r.update(logits=logits, flops_per_s=flops / r["seconds"],
                     peak_fraction=flops / r["seconds"] / limits["matmul_peak_flops"])


def guarded(name: str, fn: Callable[[], list[dict]]) -> list[dict]:
    """Run one system; a failure becomes one row with its error and the run goes on."""
    start = time.perf_counter()
    try:
        rows = fn()
    except Exception:  # noqa: BLE001 - recorded as this system's result; the other systems still run
        rows = [row(name, "error", error=traceback.format_exc()[-3000:])]
    print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    gc.collect()  # this system's weights, caches and graphs go before the next one loads
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = [r for r in data["results"] if r["error"] is None]
    for name in dict.fromkeys(r["system"] for r in rows):
        dec = sorted(((r["batch"], r["ms_per_step"]) for r in rows if r["system"] == name and r["phase"] == "decode"),
                     key=lambda p: p[0])
        pre = [(f"{r['batch']}x{r['seq']}", r["tokens_per_s"]) for r in rows
               if r["system"] == name and r["phase"] == "prefill"]
        if dec:
            ax1.plot([p[0] for p in dec], [p[1] if p[1] is not None else float("nan") for p in dec], marker="o",
                     label=name)
        if pre:
            ax2.plot([p[0] for p in pre], [p[1] for p in pre], marker="o", label=name)
    ax1.set_xscale("log", base=2)
    ax1.set(xlabel="batch", ylabel="decode ms / step", title="decode (lower is better)")
    ax2.set(xlabel="prefill shape", ylabel="tokens / s", title="prefill (higher is better)")
    gpu = data["env"]["gpus"][0] if data["env"]["gpus"] else "CPU"
    fig.suptitle(f"{data['config']['model']} on {gpu}", fontsize=10)
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    opts = parse_args(DEFAULTS, QUICK)
    if opts["static_prefill"] not in ("eager", "compile"):
        raise SystemExit(f"static_prefill={opts['static_prefill']!r} is invalid; allowed: eager, compile")
    parse_dtype(opts["dtype"])  # a bad dtype= stops here, before any system runs
    tune = opts["tune"] == "yes"
    label = " +tuning" if tune else ""
    systems: dict[str, tuple[str, Callable[[], list[dict]]]] = {
        "eager": ("eet_pipe fp16 eager", lambda: ours(opts, "fp16", graphs=False, tune=False)),
        "hf": ("HF transformers eager+SDPA", lambda: hf_sdpa(opts)),
        "static": ("plain PyTorch static cache", lambda: static_peer(opts)),
        "fp16": (f"eet_pipe fp16 graphs{label}", lambda: ours(opts, "fp16", graphs=True, tune=tune)),
        "fp16cublas": (f"eet_pipe fp16 graphs{label} cuBLAS", lambda: ours(opts, "fp16", graphs=True, tune=tune,
                                                                           gemv=False)),
        "fp16tuned": ("eet_pipe fp16 graphs +tuning", lambda: ours(opts, "fp16", graphs=True, tune=True)),
        "fp16serial": (f"eet_pipe fp16 graphs{label} serial launch",
                       lambda: ours(opts, "fp16", graphs=True, tune=tune, pdl=False)),
        "fp16plain": (f"eet_pipe fp16 graphs{label} F.linear GEMMs",
                      lambda: ours(opts, "fp16", graphs=True, tune=tune, select=False)),
        "bf16": (f"eet_pipe bf16 graphs{label}", lambda: ours(opts, "bf16", graphs=True, tune=tune)),
        "int8": (f"eet_pipe int8 graphs{label}", lambda: ours(opts, "int8", graphs=True, tune=tune)),
    }
    unknown = [k for k in opts["systems"] if k not in systems]
    if unknown:
        raise SystemExit(f"systems={','.join(unknown)} unknown; choose from {','.join(systems)}")
    cfg = presets.resolve_model(opts["model"], opts["weights"] or None).cfg
    limits = device_limits(opts["device"], peer_dtype(opts), cfg)  # before any model holds the memory
    rows = []
    for name, fn in (systems[k] for k in opts["systems"]):
        rows += guarded(name, fn)
        sync([opts["device"]])
    add_limits(rows, limits, cfg)
    data = {"env": environment(), "config": opts, "ext": eet_pipe.ops.EXT_REASON, "limits": limits, "results": rows}
    if opts["device"].startswith("cuda") and eet_pipe.ops.HAVE_EXT:  # per shape: the winner's and F.linear's us
        data["gemm_select"] = eet_pipe.ops.gemm_select.choices(torch.device(opts["device"]).index or 0)
    write_json(Path(opts["out"] + ".json"), data)
    plot(data, opts["out"] + ".png")
    print(f"{'system':<50} {'phase':<8} {'shape':>8} {'ms/step':>9} {'tok/s':>11} {'peak MiB':>9}")
    for r in rows:
        if r["error"]:
            print(f"{r['system']:<50} failed: {r['error'].strip().splitlines()[-1][:200]}")
            continue
        ms = f"{r['ms_per_step']:.2f}" if r["ms_per_step"] is not None else "-"
        mem = f"{r['peak_mem_bytes'] / 2**20:.0f}" if r["peak_mem_bytes"] else "-"
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] is not None else "-"
        print(f"{r['system']:<50} {r['phase']:<8} {r['batch']}x{r['seq']:<5} {ms:>9} {tps:>11} {mem:>9}")


if __name__ == "__main__":
    main()
