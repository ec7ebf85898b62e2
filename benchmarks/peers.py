"""Peers run on the same layers: torch.distributed.pipelining (GPipe / interleaved), forward only.

Each stage of the peer is an eet_pipe `CanonicalModel` slice wrapped to take one tensor, so the
comparison isolates the pipeline runtime (scheduling, communication), not the layer kernels.
"""

from __future__ import annotations

import statistics
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from benchmarks.common import time_it


class _Slice(nn.Module):
    """One tensor in, one tensor out: what torch.distributed.pipelining stages expect."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._metas: dict[tuple[int, ...], Any] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from eet_pipe.models.meta import prefill_meta

        meta = self._metas.get(tuple(x.shape[:2]))
        if meta is None:  # built once per shape, on the device: no host round trip per microbatch
            meta = self._metas[tuple(x.shape[:2])] = prefill_meta(torch.ones(x.shape[:2], dtype=torch.bool)).to(x.device)
        # the stage's declared output is a dense tensor (our head returns a view of a padded product)
        return self.model(x, meta).contiguous()


def _peer_worker(rank: int, world: int, port: int, cfg: dict[str, Any], out: Any) -> None:
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe, ScheduleInterleaved1F1B

    from eet_pipe.dtypes import parse_dtype
    from eet_pipe.loading import load_units
    from eet_pipe.partition.plan import Plan
    from eet_pipe.presets import resolve_model

    try:
        device = torch.device(cfg["devices"][rank])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        spec = resolve_model(cfg["model"], cfg["weights"] or None, 0)
        v = 2 if cfg["schedule"] == "interleaved" else 1
        plan = Plan.even(spec.cfg.unit_names(), cfg["devices"], virtual=v)
        chunks = plan.chunks()
        dtype = parse_dtype(cfg["dtype"])
        results = []
        for m in cfg["microbatches"]:
            stages = [PipelineStage(_Slice(load_units(spec, chunks[c], dtype, device)), c, world * v, device)
                      for c in range(rank, world * v, world)]
            sched = (ScheduleGPipe(stages[0], m) if v == 1 else ScheduleInterleaved1F1B(stages, m))
            ids = torch.randint(0, spec.cfg.vocab_size, (cfg["batch"], cfg["seq"]), device=device)

            def step() -> None:
                with torch.no_grad():
                    sched.step(ids) if rank == 0 else sched.step()

            times = []
            for i in range(cfg["warmup"] + cfg["repeats"]):
                dist.barrier()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dist.barrier()
                if i >= cfg["warmup"]:
                    times.append(time.perf_counter() - start)
            results.append({"microbatches": m, "seconds": statistics.median(times)})
            stages = sched = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if rank == 0:
            out.put(("ok", results))
    except Exception:  # noqa: BLE001 - reported to the benchmark, which records it as the peer's result
        out.put(("error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def torch_pipelining(cfg: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run the torch.distributed.pipelining peer in its own processes; returns results or the error."""
    from eet_pipe.runtime.supervisor import free_port

    world = len(cfg["devices"])
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_peer_worker, args=(r, world, port, cfg, out), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        status, payload = out.get(timeout=timeout)
    except Exception as err:  # noqa: BLE001 - queue timeout: the peer hung
        status, payload = "error", f"no result within {timeout} s ({err})"
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    return {"ok": status == "ok", "results": payload if status == "ok" else [], "error": None if status == "ok" else payload}



def fairscale_pipe(cfg: dict[str, Any], ms: list[int]) -> dict[str, Any]:
    """fairscale's `Pipe` (GPipe in one process, one partition per device, even split) timed on the same
    batch for each M; returns results or the error (fairscale is an optional benchmark peer)."""
    try:
        from fairscale.nn import Pipe
    except ImportError as err:
        return {"ok": False, "results": [], "error": f"fairscale not installed ({err})"}
    from eet_pipe.dtypes import parse_dtype
    from eet_pipe.loading import load_units
    from eet_pipe.partition.plan import Plan
    from eet_pipe.presets import resolve_model

    devices = cfg["devices"]
    results = []
    try:
        spec = resolve_model(cfg["model"], cfg["weights"] or None, 0)
        chunks = Plan.even(spec.cfg.unit_names(), devices).chunks()
        dtype = parse_dtype(cfg["dtype"])
        seq = nn.Sequential(*[_Slice(load_units(spec, c, dtype, d)) for c, d in zip(chunks, devices, strict=True)])
        ids = torch.randint(0, spec.cfg.vocab_size, (cfg["batch"], cfg["seq"]), device=devices[0])
        for m in ms:
            pipe = Pipe(seq, balance=[1] * len(devices), devices=devices, chunks=m, checkpoint="never")

            def step(pipe: Any = pipe) -> None:
                with torch.no_grad():
                    pipe(ids)

            results.append({"microbatches": m, "seconds": time_it(step, devices, cfg["warmup"], cfg["repeats"])})
    except Exception:  # noqa: BLE001 - a peer's failure is a result
        return {"ok": False, "results": results, "error": traceback.format_exc()}
    return {"ok": True, "results": results, "error": None}


def hf_gpt2(model: str, weights: str | None, device: str) -> nn.Module:
    """HF transformers' GPT2LMHeadModel (SDPA attention, fp16 on GPU) with the preset's shape and random
    weights: the reference implementation as users run it. GPT-2-family presets only."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from eet_pipe.presets import resolve_model

    cfg = resolve_model(model, weights).cfg
    if cfg.model_type != "gpt2":
        raise ValueError(f"the HF peer builds GPT-2 models; {model!r} is {cfg.model_type}")
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_positions, n_embd=cfg.hidden_size,
                        n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.intermediate_size,
                        layer_norm_epsilon=cfg.norm_eps, activation_function=cfg.activation,
                        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    with torch.device(device):  # random init on the device itself: minutes on the host for GPT-2 XL
        hf = GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype).eval()
    if hf.config._attn_implementation != "sdpa":
        raise RuntimeError(f"HF picked attention {hf.config._attn_implementation!r}, not sdpa")
    return hf
