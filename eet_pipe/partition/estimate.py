"""Unit costs from the config alone: plan a model without building or timing any of it.

`config_profile` gives the same `Profile` the profiler measures, with every number derived from the
`ArchConfig`: parameter bytes from `sizes` (each unit built on the meta device), the activation each
unit sends (its output: hidden states, or logits for the head), KV-cache bytes per token, temporaries
(`profile.estimate_temp`), and a time from a roofline on a nominal device: the larger of the unit's
FLOPs over `NOMINAL_FLOPS[dtype]` and the bytes it moves (weights, KV cache read, activations) over
`NOMINAL_BANDWIDTH`. The absolute times are indicative (an H100-class device); the balancer only needs
their ratios, which the roofline gets right for a stack of identical layers between an embedding and a
head. Memory, which decides whether a split fits, is exact up to the allocator's slack.
"""

from __future__ import annotations

import time

import torch

from eet_pipe.loading.presets import ModelSpec
from eet_pipe.models.config import ArchConfig
from eet_pipe.models.dtypes import dtype_name, parse_dtype
from eet_pipe.partition.costs import UnitCost
from eet_pipe.partition.profile import Profile, Workload, estimate_temp, profile_key
from eet_pipe.partition.sizes import tied_elements, unit_size

__all__ = ["CONFIG_HARDWARE", "NOMINAL_BANDWIDTH", "NOMINAL_FLOPS", "config_profile", "unit_cost"]

CONFIG_HARDWARE = "config"
"""The hardware name in the key of a config-derived profile."""
NOMINAL_FLOPS = {"fp32": 60e12, "fp16": 700e12, "bf16": 700e12}
"""Sustained dense matmul FLOP/s of the nominal device per dtype."""
NOMINAL_BANDWIDTH = 3.0e12
"""Sustained memory bandwidth of the nominal device, bytes/s."""


def _keys(workload: Workload) -> float:
    """Keys each new token attends to, on average (causal prefill: half the sequence)."""
    return (workload.seq + 1) / 2 if workload.kind == "prefill" else workload.context + 1


def unit_cost(cfg: ArchConfig, unit: str, dtype: str, workload: Workload) -> UnitCost:
    """The cost of `unit` for one microbatch of `workload` in `dtype` ('fp32', 'fp16' or 'bf16')."""
    elem = torch.empty((), dtype=parse_dtype(dtype)).element_size()
    size = unit_size(cfg, unit)
    rows = workload.batch * workload.new_tokens
    weights = size.params * elem
    kv_per_token, flops, moved = 0, 0.0, float(weights)
    if unit == "embed":
        out = rows * cfg.hidden_size * elem
        moved = 2.0 * out  # rows gathered from the table, hidden states written
    elif unit == "head":
        out = rows * cfg.vocab_size * elem  # the logits
        flops = 2.0 * rows * cfg.hidden_size * cfg.vocab_size
        moved += rows * cfg.hidden_size * elem + out
    else:
        out = rows * cfg.hidden_size * elem
        kv_per_token = 2 * cfg.num_kv_heads * cfg.head_dim * elem  # keys + values of one layer
        keys = _keys(workload)
        flops = 2.0 * rows * size.quantizable + 4.0 * rows * cfg.num_heads * cfg.head_dim * keys
        cached = workload.batch * keys * kv_per_token if workload.kind == "decode" else 0
        moved += cached + 2 * out
    seconds = max(flops / NOMINAL_FLOPS[dtype], moved / NOMINAL_BANDWIDTH)
    return UnitCost(unit, seconds, weights, out, kv_per_token, estimate_temp(cfg, unit, workload, elem),
                    tied_elements(cfg, unit) * elem)


def config_profile(spec: ModelSpec, dtype: torch.dtype | str, workload: Workload) -> Profile:
    """Every unit's cost for one microbatch of `workload`, from `spec.cfg` only (nothing is built or run)."""
    name = dtype_name(parse_dtype(dtype))
    workload.check(spec.cfg)
    layer = unit_cost(spec.cfg, "layers.0", name, workload)
    units = [unit_cost(spec.cfg, u, name, workload) if not u.startswith("layers.") else
             UnitCost(u, layer.time_s, layer.param_bytes, layer.act_bytes, layer.kv_bytes_per_token, layer.temp_bytes)
             for u in spec.cfg.unit_names()]
    info = {"source": "config", "flops": NOMINAL_FLOPS[name], "bandwidth": NOMINAL_BANDWIDTH,
            "note": "times from a roofline on a nominal device; parameter, KV and activation bytes from the config",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    key = profile_key(spec, CONFIG_HARDWARE, name, workload)
    return Profile(key, units, CONFIG_HARDWARE, name, workload, info, measured=False)
