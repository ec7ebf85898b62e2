"""Weight mapping tables and checkpoint loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from eet_pipe.weights import CheckpointError, MappingError, load_checkpoint, mapping_for, to_hf
from eet_pipe.weights.loader import config_from_hf, read_hf_config
from eet_pipe.weights.mapping import from_hf, normalise_keys


def _state(path):
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("fixture", ["gpt2_dir", "llama_dir", "bert_dir"])
def test_round_trip_is_exact(fixture, request):
    path = request.getfixturevalue(fixture)
    sd = _state(path)
    hf_cfg = read_hf_config(path)
    mapping = mapping_for(hf_cfg["model_type"])
    names = normalise_keys(sd.keys(), mapping, config_from_hf(hf_cfg))
    cfg = mapping.adjust_config(config_from_hf(hf_cfg), set(names))
    table = mapping.expanded(cfg)
    canonical = from_hf(lambda n: sd[names[n]], mapping, cfg, table.keys())
    back = to_hf(canonical, mapping, cfg)
    original = {n: sd[k] for n, k in names.items()}
    assert set(back) == set(original)
    for k in original:
        assert torch.equal(back[k], original[k]), k


def _write_sharded(src, dst):
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    keys = sorted(sd)
    half = len(keys) // 2
    weight_map = {}
    for n, part in enumerate((keys[:half], keys[half:])):
        name = f"model-0000{n + 1}-of-00002.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, str(dst / name))
        weight_map.update({k: name for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _write_bin(src, dst):
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    torch.save(sd, dst / "pytorch_model.bin")


def test_safetensors_sharded_and_bin_give_identical_models(llama_dir, tmp_path):
    _write_sharded(llama_dir, tmp_path / "sharded")
    _write_bin(llama_dir, tmp_path / "bin")
    ref = load_checkpoint(llama_dir).state_dict()
    for variant in ("sharded", "bin"):
        other = load_checkpoint(tmp_path / variant).state_dict()
        assert other.keys() == ref.keys()
        assert all(torch.equal(other[k], ref[k]) for k in ref), variant


def test_loading_a_layer_range_reads_only_its_tensors(gpt2_dir):
    units = ["layers.3", "layers.4", "layers.5"]
    model = load_checkpoint(gpt2_dir, units)
    reads = set(model.checkpoint.reads)
    assert reads and all(k.startswith(("transformer.h.3.", "transformer.h.4.", "transformer.h.5.")) for k in reads)
    assert len(reads) == 3 * 12
    assert sorted(model.layers.keys()) == ["3", "4", "5"]
    assert model.embed is None and model.head is None
    full = load_checkpoint(gpt2_dir)
    assert torch.equal(model.layers["4"].mlp.up.weight, full.layers["4"].mlp.up.weight)


def test_slice_with_head_but_no_embed_reads_tied_weight(gpt2_dir):
    model = load_checkpoint(gpt2_dir, ["layers.5", "head"])
    full = load_checkpoint(gpt2_dir)
    assert torch.equal(model.head.weight, full.embed.tok.weight)


def _break(name: str, sd: dict) -> None:
    """One broken copy of the GPT-2 checkpoint per case."""
    if name == "missing":
        del sd["transformer.h.2.mlp.c_fc.weight"]
    elif name == "unexpected":
        sd["transformer.h.0.attn.surprise"] = torch.zeros(3)
    else:
        sd["transformer.h.1.ln_2.weight"] = torch.ones(7)


@pytest.mark.parametrize("case,message", [
    ("missing", r"missing keys.*transformer\.h\.2\.mlp\.c_fc\.weight"),
    ("unexpected", r"unexpected keys.*transformer\.h\.0\.attn\.surprise"),
    ("shape", r"shape mismatch for layers\.1\.mlp\.norm\.weight"),
])
def test_bad_keys_and_shapes_are_named(case, message, gpt2_dir, tmp_path):
    dst = tmp_path / case
    shutil.copytree(gpt2_dir, dst)
    sd = load_file(str(dst / "model.safetensors"))
    _break(case, sd)
    save_file(sd, str(dst / "model.safetensors"))
    with pytest.raises(MappingError, match=message):
        load_checkpoint(dst)


def test_corrupted_file_is_reported(gpt2_dir, tmp_path):
    dst = tmp_path / "corrupt"
    shutil.copytree(gpt2_dir, dst)
    (dst / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_checkpoint(dst)


def test_unsupported_architecture(gpt2_dir, tmp_path):
    dst = tmp_path / "t5"
    shutil.copytree(gpt2_dir, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "t5"
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture model_type='t5'; supported: bert, gpt2, llama"):
        load_checkpoint(dst)


def test_from_torch_converts_in_memory_model():
    from eet_pipe.weights import from_torch
    from tests.hf_models import make_llama

    hf = make_llama(layers=2)
    ours = from_torch(hf)
    assert torch.equal(ours.layers["1"].mlp.gate.weight, hf.model.layers[1].mlp.gate_proj.weight)
    q = hf.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(ours.layers["0"].attn.qkv.weight[: q.shape[0]], q)
