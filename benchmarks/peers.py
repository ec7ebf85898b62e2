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
from eet_pipe.models.config import ArchConfig


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

    from eet_pipe.loading.presets import resolve_model
    from eet_pipe.loading.units import load_units
    from eet_pipe.models.dtypes import parse_dtype
    from eet_pipe.partition.plan import Plan

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
    from eet_pipe.loading.presets import resolve_model
    from eet_pipe.loading.units import load_units
    from eet_pipe.models.dtypes import parse_dtype
    from eet_pipe.partition.plan import Plan

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

    from eet_pipe.loading.presets import resolve_model

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


def hf_config(cfg: ArchConfig) -> Any:
    """The HF transformers config of a GPT-2 or LLaMA-family `ArchConfig`."""
    from transformers import GPT2Config, LlamaConfig

    if cfg.model_type == "gpt2":
        return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_positions, n_embd=cfg.hidden_size,
                          n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.intermediate_size,
                          layer_norm_epsilon=cfg.norm_eps, activation_function=cfg.activation,
                          tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_token_id,
                          eos_token_id=cfg.eos_token_id)
    if cfg.model_type != "llama":
        raise ValueError(f"the HF reference is built for gpt2 and llama models; {cfg.model_type!r} is neither")
    rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type != "default":
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_positions)
    act = {"silu_gated": "silu", "gelu_gated": "gelu_pytorch_tanh"}[cfg.activation]
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act=act,
                       max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_eps,
                       tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias,
                       rope_parameters=rope, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                       pad_token_id=cfg.pad_token_id)


def hf_from_canonical(cfg: ArchConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                      device: torch.device | str) -> nn.Module:
    """HF transformers' causal LM (SDPA attention) holding the canonical tensors `state` (already of `dtype`
    on `device`) through eet_pipe's mapping table: the reference implementation as users run it, with the
    very weights the other systems run. Tensors the mapping only re-slices (LLaMA's q/k/v) are shared."""
    from transformers import AutoModelForCausalLM

    from eet_pipe.weights import mapping_for, to_hf

    mapping = mapping_for(cfg.model_type)
    tensors = to_hf({k: v[: cfg.vocab_size] if k in ("head.weight", "embed.tok.weight") else v
                     for k, v in state.items()}, mapping, cfg)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hf_config(cfg), attn_implementation="sdpa", dtype=dtype).eval()
    missing, unexpected = hf.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"canonical weights do not fill HF's {type(hf).__name__}: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    if cfg.tie_embeddings:
        hf.tie_weights()
    if hf.config._attn_implementation != "sdpa":
        raise RuntimeError(f"HF picked attention {hf.config._attn_implementation!r}, not sdpa")
    return hf.requires_grad_(False)
