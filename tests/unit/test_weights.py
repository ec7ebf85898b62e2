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
from eet_pipe.weights.registry import ARCHS
from tests.hf_models import mistral_dir, qwen2_dir, qwen3_dir  # noqa: F401  (fixtures)


def _state(path):
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("fixture", ["gpt2_dir", "llama_dir", "bert_dir", "mistral_dir", "qwen2_dir", "qwen3_dir"])
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
    with pytest.raises(ValueError, match="unsupported architecture model_type='t5'; supported: bert, gpt2, llama, "
                                         "mistral, qwen2, qwen3"):
        load_checkpoint(dst)


def test_from_torch_converts_in_memory_model():
    from eet_pipe.weights import from_torch
    from tests.hf_models import make_llama

    hf = make_llama(layers=2)
    ours = from_torch(hf)
    assert torch.equal(ours.layers["1"].mlp.gate.weight, hf.model.layers[1].mlp.gate_proj.weight)
    q = hf.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(ours.layers["0"].attn.qkv.weight[: q.shape[0]], q)


def test_registry_is_keyed_by_each_tables_model_type():
    assert sorted(ARCHS) == ["bert", "gpt2", "llama", "mistral", "qwen2", "qwen3"]
    assert all(mapping.model_type == name for name, mapping in ARCHS.items())


def test_new_decoder_configs_read_their_pieces(mistral_dir, qwen2_dir, qwen3_dir):  # noqa: F811
    mistral = config_from_hf(read_hf_config(mistral_dir))
    assert (mistral.sliding_window, mistral.sliding_window_layers, mistral.head_dim) == (6, None, 24)
    assert (mistral.num_kv_heads, mistral.qkv_bias, mistral.out_bias, mistral.qk_norm) == (2, False, False, False)
    assert [mistral.window(i) for i in range(mistral.num_layers)] == [6] * 4
    qwen2 = config_from_hf(read_hf_config(qwen2_dir))
    assert (qwen2.qkv_bias, qwen2.out_bias, qwen2.tie_embeddings) == (True, False, True)
    assert [qwen2.window(i) for i in range(qwen2.num_layers)] == [None, None, 5, 5]
    qwen3 = config_from_hf(read_hf_config(qwen3_dir))
    assert (qwen3.qk_norm, qwen3.head_dim, qwen3.sliding_window, qwen3.qkv_bias) == (True, 32, None, False)


def _qwen2_hf(**extra) -> dict:
    return {"model_type": "qwen2", "vocab_size": 10, "hidden_size": 16, "num_hidden_layers": 4,
            "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32, **extra}


@pytest.mark.parametrize("extra,windows", [
    ({"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 1}, [None] * 4),  # HF drops it
    ({"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, [None, 8, 8, 8]),
    ({"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}, [8] * 4),
    ({"use_sliding_window": True, "sliding_window": 8,
      "layer_types": ["sliding_attention", "full_attention"] * 2}, [8, None, 8, None]),
    ({"sliding_window": None, "layer_types": ["full_attention"] * 4}, [None] * 4),
])
def test_qwen_sliding_window_follows_what_hf_applies(extra, windows):
    cfg = config_from_hf(_qwen2_hf(**extra))
    assert [cfg.window(i) for i in range(4)] == windows


def test_qwen_bad_layer_types_are_named():
    with pytest.raises(ValueError, match="layer_types=.*chunked_attention"):
        config_from_hf(_qwen2_hf(layer_types=["chunked_attention"] * 4))


def test_qwen3_without_head_dim_uses_hfs_default_of_128():
    hf = {**_qwen2_hf(), "model_type": "qwen3"}
    assert config_from_hf(hf).head_dim == 128


@pytest.mark.parametrize("form", ["rope_scaling", "rope_parameters"])
def test_llama3_rope_scaling_reads_both_config_forms(form):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    hf = {"model_type": "llama", "vocab_size": 10, "hidden_size": 16, "num_hidden_layers": 1,
          "num_attention_heads": 2, "intermediate_size": 32}
    if form == "rope_scaling":
        hf.update(rope_theta=500000.0, rope_scaling=scaling)
    else:
        hf.update(rope_parameters={**scaling, "rope_theta": 500000.0})
    cfg = config_from_hf(hf)
    assert (cfg.rope_type, cfg.rope_theta, cfg.rope_factor, cfg.rope_original_max_positions) == (
        "llama3", 500000.0, 8.0, 64)


def test_qwen3_missing_q_norm_is_named(qwen3_dir, tmp_path):  # noqa: F811
    dst = tmp_path / "broken"
    shutil.copytree(qwen3_dir, dst)
    sd = load_file(str(dst / "model.safetensors"))
    del sd["model.layers.1.self_attn.q_norm.weight"]
    save_file(sd, str(dst / "model.safetensors"))
    with pytest.raises(MappingError, match=r"missing keys.*model\.layers\.1\.self_attn\.q_norm\.weight"):
        load_checkpoint(dst)


def test_qwen2_without_its_qkv_bias_is_named(qwen2_dir, tmp_path):  # noqa: F811
    dst = tmp_path / "nobias"
    shutil.copytree(qwen2_dir, dst)
    sd = load_file(str(dst / "model.safetensors"))
    sd = {k: v for k, v in sd.items() if not k.endswith("_proj.bias")}
    save_file(sd, str(dst / "model.safetensors"))
    with pytest.raises(MappingError, match=r"missing keys \(12\): model\.layers\.0\.self_attn\.k_proj\.bias"):
        load_checkpoint(dst)
