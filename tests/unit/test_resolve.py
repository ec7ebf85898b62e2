"""model= resolution: directories, the local HF cache, presets; clear errors otherwise."""

from __future__ import annotations

import shutil

import pytest

from eet_pipe import from_pretrained
from eet_pipe.loading.presets import ModelNotFoundError, list_presets, resolve_model


def test_presets_are_listed():
    names = list_presets()
    for required in ("tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "bert-base-uncased", "llama-7b",
                     "tinyllama-1.1b", "llama-3-8b", "llama-3-70b", "qwen2.5-7b", "qwen2.5-72b", "mistral-7b"):
        assert required in names


def test_nonexistent_path_lists_what_was_tried():
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("/no/such/dir")
    text = str(err.value)
    assert "directory /no/such/dir" in text and "HF cache" in text and "preset" in text


def test_unknown_preset():
    with pytest.raises(ModelNotFoundError, match="model='gpt5' not found"):
        resolve_model("gpt5")


def test_preset_needs_weights_random():
    with pytest.raises(ModelNotFoundError, match="weights=random"):
        resolve_model("gpt2-xl")
    spec = resolve_model("gpt2-xl", weights="random")
    assert spec.source == "random" and spec.cfg.num_layers == 48 and spec.cfg.num_heads == 25


def test_invalid_weights_value():
    with pytest.raises(ValueError, match="weights='zeros' is invalid"):
        resolve_model("gpt2", weights="zeros")


def test_tiny_needs_nothing():
    lm = from_pretrained("tiny")
    out = lm.generate("Hi", max_new_tokens=4, ignore_eos=True)
    assert len(out[0].token_ids) == 4 and isinstance(out[0].text, str)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="not an HF checkpoint"):
        resolve_model(str(tmp_path))


def test_hf_cache_name_resolves_offline(gpt2_dir, tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--acme--tiny-gpt2" / "snapshots" / "abc123"
    shutil.copytree(gpt2_dir, snap)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = resolve_model("acme/tiny-gpt2")
    assert spec.source == "dir" and spec.path == snap


def test_tokenizer_is_read_from_the_model_directory(gpt2_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    dst = tmp_path / "with_tok"
    shutil.copytree(gpt2_dir, dst)
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "hello", "world", "pipe", "line"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<eos>").save_pretrained(dst)
    lm = from_pretrained(str(dst))
    assert type(lm.tokenizer).__name__ == "HFTokenizer"
    assert lm.tokenizer.encode("hello pipe line") == [2, 4, 5]
    out = lm.generate("hello world", max_new_tokens=5, ignore_eos=True)[0]
    assert out.prompt_ids == [2, 3] and len(out.token_ids) == 5 and isinstance(out.text, str)
