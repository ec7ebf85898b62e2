"""Each stage builds only its own weights, directly where it runs.

* `weights=random`: every unit's numbers depend only on the seed and the unit's name, so stages of any
  split equal one whole model; no process ever holds more than its own units (peak RSS per process).
* HF checkpoints: a stage reads only its own tensors from the shards (peak RSS per process).

Each stage is built in a child process: its whole-life peak RSS (`VmHWM`, the interpreter and torch
included; `ru_maxrss` would carry the parent's over fork + exec) and the peak of the build itself (`VmHWM`
after resetting it through /proc/self/clear_refs, less the RSS before the build), with every weight read once
after the build: a checkpoint's tensors are memory-mapped from the shards (safetensors), so they count once
touched, and only the stage's own.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from eet_pipe.loading.presets import ModelSpec, resolve_model
from eet_pipe.loading.units import load_units
from eet_pipe.models.config import ArchConfig
from eet_pipe.models.dtypes import parse_dtype
from eet_pipe.partition import Plan
from eet_pipe.partition.sizes import weight_bytes
from eet_pipe.weights import loader, mapping_for, to_hf
from eet_pipe.weights.loader import init_random

SMALL = ArchConfig(model_type="llama", vocab_size=301, hidden_size=48, num_layers=5, num_heads=6, num_kv_heads=2,
                   intermediate_size=80, norm="rmsnorm", activation="silu_gated", positions="rotary", qkv_bias=False,
                   out_bias=False, mlp_bias=False, tie_embeddings=False, max_positions=64)
TIED = ArchConfig(model_type="gpt2", vocab_size=257, hidden_size=32, num_layers=4, num_heads=4, max_positions=64)
MIB = 1 << 20


def _stages(cfg: ArchConfig, p: int) -> list[list[str]]:
    return [st.units for st in Plan.even(cfg.unit_names(), ["cpu"] * p).stages]


@pytest.mark.parametrize("cfg", [SMALL, TIED], ids=["llama-gqa", "gpt2-tied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unit_weights_are_the_same_whatever_the_split(cfg, dtype):
    spec = ModelSpec(name="small", cfg=cfg, source="random", weights_seed=7)
    whole = load_units(spec, None, dtype, "cpu").state_dict()
    for p in (1, 2, 3):
        seen = set()
        for units in _stages(cfg, p):
            part = load_units(spec, units, dtype, "cpu").state_dict()
            for name, tensor in part.items():
                assert tensor.dtype == dtype and torch.equal(tensor, whole[name]), (p, units, name)
            seen |= set(part)
        assert seen == set(whole)
    if cfg.tie_embeddings:  # the head alone (on the last stage) reads the embedding's numbers
        head = load_units(spec, ["layers.3", "head"], dtype, "cpu").state_dict()["head.weight"]
        assert torch.equal(head, whole["embed.tok.weight"])
    other = load_units(ModelSpec(name="small", cfg=cfg, source="random", weights_seed=8), None, dtype, "cpu").state_dict()
    assert not torch.equal(other["layers.1.attn.qkv.weight"], whole["layers.1.attn.qkv.weight"])


def test_reduced_dtypes_are_the_fp32_weights_rounded(monkeypatch):
    monkeypatch.setattr(loader, "RANDOM_BLOCK", 64)  # many blocks, and remainders under 16
    full = init_random(SMALL, seed=3).state_dict()
    for dtype in (torch.bfloat16, torch.float16):
        reduced = init_random(SMALL, seed=3, dtype=dtype).state_dict()
        assert all(torch.equal(reduced[k], full[k].to(dtype)) for k in full)
    monkeypatch.setattr(loader, "RANDOM_BLOCK", 32)
    assert loader._blocks(70) == [(0, 32), (32, 38)]  # a remainder of 6 joins the last block
    assert loader._blocks(96) == [(0, 32), (32, 32), (64, 32)] and loader._blocks(20) == [(0, 20)]


# ---- peak host RSS per stage, one child process per stage ----

def _status(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _build_stage(source: str, weights: str | None, units: list[str], dtype: str, queue: mp.Queue) -> None:
    """Child: build `units` of `source` (a preset name or a checkpoint directory) on the CPU; report
    (peak RSS of the process, peak RSS growth during the build, bytes of the stage's tensors)."""
    spec = resolve_model(source, weights)
    init_random(SMALL, dtype=parse_dtype(dtype))  # first-use costs (thread pools, lazy imports) before measuring
    imports = _status("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    model = load_units(spec, units, parse_dtype(dtype), "cpu")
    for tensor in model.state_dict().values():  # read every weight once, as a forward would (mapped pages load)
        tensor.sum()
    built = _status("VmHWM")
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(f"{units[0]}..{units[-1]}: RssAnon {_status('RssAnon') >> 20} MiB, RssFile {_status('RssFile') >> 20} MiB "
          f"(of which the process had {before >> 20} MiB before the build)", flush=True)
    queue.put((max(imports, built), built - before, held))


def _peak_rss(source: str, weights: str | None, stages: list[list[str]], dtype: str) -> list[tuple[int, int, int]]:
    """(peak RSS, peak growth while building, stage bytes) of each stage's process, built one after another."""
    ctx = mp.get_context("spawn")
    out = []
    for units in stages:
        queue = ctx.Queue()
        proc = ctx.Process(target=_build_stage, args=(source, weights, units, dtype, queue))
        proc.start()
        result = queue.get(timeout=900)
        proc.join(60)
        assert proc.exitcode == 0
        out.append(result)
    return out


def _report(label: str, full: int, rss: list[tuple[int, int, int]]) -> None:
    for s, (peak, grew, held) in enumerate(rss):
        print(f"{label} stage {s}: process peak RSS {peak / MIB:.0f} MiB = {peak / full:.2f} x the whole model's "
              f"{full / MIB:.0f} MiB; the build's peak growth {grew / MIB:.0f} MiB for {held / MIB:.0f} MiB of weights")


@pytest.mark.slow
def test_two_stage_llama_3_8b_random_build_stays_under_six_tenths_of_the_model():
    cfg = resolve_model("llama-3-8b", "random").cfg
    full = weight_bytes(cfg, "bf16")
    rss = _peak_rss("llama-3-8b", "random", _stages(cfg, 2), "bf16")
    _report("llama-3-8b random bf16", full, rss)
    for peak, grew, held in rss:
        assert peak < 0.6 * full
        assert grew < held + 128 * MIB  # its own weights and one block of draws, nothing more
    assert sum(held for _, _, held in rss) == full


def _write_checkpoint(cfg: ArchConfig, path: Path, shards: int) -> None:
    """An HF llama checkpoint of `cfg` in `shards` safetensors files with an index, in bf16."""
    from transformers import LlamaConfig

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_positions,
                         tie_word_embeddings=False)
    path.mkdir(parents=True)
    hf_cfg.to_json_file(str(path / "config.json"))
    state = to_hf(init_random(cfg, dtype=torch.bfloat16).state_dict(), mapping_for("llama"), cfg)
    keys = list(state)
    per = -(-len(keys) // shards)
    weight_map = {}
    for n in range(shards):
        name = f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[n * per:(n + 1) * per]}
        save_file(part, str(path / name))
        weight_map.update(dict.fromkeys(part, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.slow
def test_stages_build_only_their_tensors_from_checkpoint_or_random(tmp_path):
    cfg = SMALL.replace(vocab_size=32000, hidden_size=2048, num_layers=10, num_heads=16, num_kv_heads=4,
                        head_dim=None, intermediate_size=5632, max_positions=2048)
    _write_checkpoint(cfg, tmp_path / "ckpt", shards=4)
    full = weight_bytes(cfg, "bf16")
    stages = _stages(cfg, 2)
    for weights in ("checkpoint", "random"):
        rss = _peak_rss(str(tmp_path / "ckpt"), weights, stages, "bf16")
        _report(f"1.2B-class llama, {weights} weights, bf16:", full, rss)
        for _, grew, held in rss:
            # its own tensors (+ one block of draws and allocator slack), far from the other stage's
            assert grew < held + (full - held) / 2, f"a stage ({weights}) built more than its own tensors"


def _build_on_gpu(units: list[str], queue: mp.Queue) -> None:
    """Child: build `units` of llama-3-8b with random bf16 weights on cuda:0; report (host RSS growth,
    GPU bytes allocated at the peak, bytes of the stage's tensors)."""
    spec = resolve_model("llama-3-8b", "random")
    init_random(SMALL, dtype=torch.bfloat16, device="cuda:0")  # CUDA context and first-use costs first
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    torch.cuda.reset_peak_memory_stats(0)
    model = load_units(spec, units, torch.bfloat16, "cuda:0")
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    queue.put((_status("VmHWM") - before, torch.cuda.max_memory_allocated(0), held))


@pytest.mark.cuda
def test_random_stage_is_created_on_its_gpu_not_on_the_host():
    cfg = resolve_model("llama-3-8b", "random").cfg
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_build_on_gpu, args=(_stages(cfg, 2)[0], queue))
    proc.start()
    grew, gpu_peak, held = queue.get(timeout=600)
    proc.join(60)
    print(f"llama-3-8b stage 0 on cuda:0: host RSS growth {grew / MIB:.0f} MiB, GPU peak {gpu_peak / MIB:.0f} MiB "
          f"for {held / MIB:.0f} MiB of weights")
    assert proc.exitcode == 0 and grew < 256 * MIB  # nothing of the weights passes through the host
    # the weights plus the fp32 draws of the largest tensor (the embedding: 2 GiB), freed after
    assert gpu_peak < held + 4 * cfg.vocab_size * cfg.hidden_size + 64 * MIB
