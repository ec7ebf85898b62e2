"""The static-cache benchmark peer (benchmarks/peer_static.py) computes what eet_pipe and HF transformers
compute: greedy tokens equal on tiny GPT-2 and LLaMA (grouped-query, llama3 rope scaling) models in fp32 on
CPU, eager, at batch 1 and batch 3; the HF reference built from canonical weights equals the original."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import eet_pipe
from benchmarks.peer_static import build_peer, greedy_generate
from benchmarks.peers import hf_from_canonical
from tests.hf_models import _randomise

STEPS = 8


def _prompts(vocab: int, batch: int, length: int = 11) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(batch))


def _peer_tokens(lm, ids: torch.Tensor, steps: int = STEPS) -> torch.Tensor:
    peer = build_peer(lm.cfg, dict(lm.model.state_dict()))
    peer.setup_caches(ids.shape[0], ids.shape[1] + steps)
    return greedy_generate(peer, ids, steps)


def _ours(lm, ids: torch.Tensor) -> torch.Tensor:
    got = lm.generate(ids.tolist(), max_new_tokens=STEPS, ignore_eos=True)
    return torch.tensor([r.token_ids for r in got])


def _hf(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, min_new_tokens=STEPS,
                          do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    """LLaMA with grouped-query attention 8:2 and llama3 rope scaling, tied embeddings off."""
    cfg = LlamaConfig(vocab_size=199, hidden_size=160, intermediate_size=300, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=20, max_position_embeddings=128,
                      rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16})
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("llama3")
    _randomise(LlamaForCausalLM(cfg), 3, 0.1).save_pretrained(path)
    return path


@pytest.mark.parametrize("fixture", ["gpt2_dir", "llama_dir", "llama3_dir"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_tokens_equal_eet_pipe_and_hf(fixture, batch, request):
    path = request.getfixturevalue(fixture)
    lm = eet_pipe.from_pretrained(str(path), dtype="fp32")
    ids = _prompts(lm.cfg.vocab_size, batch)
    peer = _peer_tokens(lm, ids)
    assert peer.shape == (batch, STEPS)
    assert len(set(peer.flatten().tolist())) > 2  # varied tokens: the comparison means something
    assert torch.equal(peer, _ours(lm, ids))
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    assert torch.equal(peer, _hf(hf, ids))


@pytest.mark.parametrize("fixture", ["gpt2_dir", "llama3_dir"])
def test_hf_reference_built_from_canonical_weights_equals_the_checkpoint(fixture, request):
    path = request.getfixturevalue(fixture)
    lm = eet_pipe.from_pretrained(str(path), dtype="fp32")
    rebuilt = hf_from_canonical(lm.cfg, dict(lm.model.state_dict()), torch.float32, "cpu")
    original = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    ids = _prompts(lm.cfg.vocab_size, 2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, original(ids).logits, rtol=0, atol=1e-5)
    assert torch.equal(_hf(rebuilt, ids), _hf(original, ids))


def test_peer_refuses_what_it_cannot_run(bert_dir, gpt2_dir):
    lm = eet_pipe.from_pretrained(str(bert_dir), dtype="fp32")
    with pytest.raises(ValueError, match="pre-norm decoders"):
        build_peer(lm.cfg, dict(lm.model.state_dict()))
    lm = eet_pipe.from_pretrained(str(gpt2_dir), dtype="fp32")
    state = dict(lm.model.state_dict())
    with pytest.raises(ValueError, match="lacks 1 tensor"):
        build_peer(lm.cfg, {k: v for k, v in state.items() if k != "layers.0.mlp.up.bias"})
    peer = build_peer(lm.cfg, state)
    peer.setup_caches(2, 16)
    with pytest.raises(ValueError, match="do not fit the caches"):
        greedy_generate(peer, _prompts(lm.cfg.vocab_size, 2, 12), 6)
    with pytest.raises(ValueError, match="learned positions"):
        peer.setup_caches(1, 4096)


def test_weights_are_shared_with_the_canonical_model(llama_dir):
    lm = eet_pipe.from_pretrained(str(llama_dir), dtype="fp32")
    state = dict(lm.model.state_dict())
    peer = build_peer(lm.cfg, state)
    assert peer.layers[0].attn.qkv.weight.data_ptr() == state["layers.0.attn.qkv.weight"].data_ptr()
    assert peer.head.weight.data_ptr() == state["head.weight"].data_ptr()


@pytest.mark.cuda
@pytest.mark.parametrize(("fixture", "dtype", "batch", "compile_prefill"), [
    ("gpt2_dir", "fp32", 1, False), ("gpt2_dir", "fp32", 4, True), ("llama3_dir", "fp32", 4, False),
    ("llama3_dir", "fp16", 4, True)])
def test_compiled_steps_on_gpu_equal_the_eager_model(fixture, dtype, batch, compile_prefill, request):
    """The benchmark's configuration: decode under torch.compile(mode="reduce-overhead") (CUDA graphs) at
    static shapes; fp32 tokens equal the eager peer's and eet_pipe's, fp16 replays give the first run's."""
    from benchmarks.peer_static import compile_steps

    path = request.getfixturevalue(fixture)
    lm = eet_pipe.from_pretrained(str(path), dtype=dtype, device="cuda:0")
    peer = build_peer(lm.cfg, dict(lm.model.state_dict()))
    torch._dynamo.reset()
    ids = _prompts(lm.cfg.vocab_size, batch).cuda()
    peer.setup_caches(batch, ids.shape[1] + STEPS)
    eager = greedy_generate(peer, ids, STEPS)
    compiled = compile_steps(peer, prefill=compile_prefill)
    first = greedy_generate(peer, ids, STEPS, *compiled)
    again = greedy_generate(peer, ids, STEPS, *compiled)  # replayed from the recorded graph
    torch._dynamo.reset()
    assert first.shape == again.shape == (batch, STEPS)
    assert torch.equal(first, again)
    if dtype == "fp32":
        assert torch.equal(first, eager)
        assert torch.equal(first.cpu(), _ours(eet_pipe.from_pretrained(str(path), dtype="fp32"), ids.cpu()))
