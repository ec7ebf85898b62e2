"""Built-in weights of the `tiny` preset: trained by the project itself, on first use, from a small
embedded text, in a few seconds on a CPU, then cached. No download, no files in the repository.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from eet_pipe.loading.tokenizer import ByteTokenizer
from eet_pipe.models.config import ArchConfig
from eet_pipe.models.meta import prefill_meta
from eet_pipe.models.model import CanonicalModel
from eet_pipe.weights.loader import init_random

__all__ = ["builtin_state", "cache_dir", "CORPUS"]

log = logging.getLogger("eet_pipe.loading.builtin")

CORPUS = """\
Hello, world! Hello there. Hello again, and welcome to the pipeline.
A model is a list of layers. The layers are cut into stages, and each stage runs on its own device.
The first stage embeds the tokens, the middle stages transform them, and the last stage predicts the next token.
Microbatches flow through the stages like water through pipes, so every device stays busy.
Hello, said the first stage to the second. Hello, said the second stage to the third.
The schedule decides what each stage does next: receive, compute, send.
When the bubble is small, the pipeline is fast. When the bubble is large, the devices wait.
Hello, pipeline! The tokens go in, the text comes out, one token at a time.
Good morning. Good evening. Hello, friend, and thank you for reading.
"""

TRAIN_STEPS, BATCH, SEQ, LR = 600, 16, 64, 3e-3


def cache_dir() -> Path:
    """Where eet_pipe caches built weights and profiles (EET_PIPE_CACHE, else ~/.cache/eet_pipe)."""
    return Path(os.environ.get("EET_PIPE_CACHE", Path.home() / ".cache" / "eet_pipe"))


def _key(cfg: ArchConfig, seed: int) -> str:
    """The cache key: what the weights depend on. Config fields at their class default are left out, so a
    field added to ArchConfig later does not make every machine train the model again."""
    default = ArchConfig()
    fields = {k: v for k, v in cfg.to_dict().items() if v != getattr(default, k)}
    blob = json.dumps([fields, seed, CORPUS, TRAIN_STEPS, BATCH, SEQ, LR], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _train(cfg: ArchConfig, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = init_random(cfg, seed=seed).train().requires_grad_(True)
    data = torch.tensor(ByteTokenizer().encode(CORPUS), dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    meta = prefill_meta(torch.ones(BATCH, SEQ, dtype=torch.bool))
    from tqdm import tqdm

    for step in tqdm(range(TRAIN_STEPS), desc="building the tiny model (once)", leave=False, disable=None):
        starts = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=gen)
        batch = torch.stack([data[s:s + SEQ + 1] for s in starts.tolist()])
        logits = model(batch[:, :-1], meta)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = LR * min(1.0, (TRAIN_STEPS - step) / (0.3 * TRAIN_STEPS))
        opt.step()
    log.info("built-in tiny model trained: final loss %.3f", loss.item())
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "head.weight"}


def builtin_state(cfg: ArchConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Canonical tensors of the built-in model (trained once, then read from the cache)."""
    path = cache_dir() / "builtin" / f"{cfg.model_type}-{_key(cfg, seed)}.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # one builder at a time (workers, torchrun ranks and test processes may all start cold):
        # the others wait on the lock, then read the file the first one wrote
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                start = time.perf_counter()
                state = _train(cfg, seed)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                save_file(state, str(tmp))
                os.replace(tmp, path)  # atomic: readers that skip the lock never see a partial file
                log.info("built-in weights written to %s in %.1f s", path, time.perf_counter() - start)
    state = load_file(str(path))
    if cfg.tie_embeddings:
        state["head.weight"] = state["embed.tok.weight"]
    return state


def builtin_model(cfg: ArchConfig, units: list[str] | None, seed: int, dtype: torch.dtype,
                  device: torch.device | str) -> CanonicalModel:
    """The built-in model (or a slice of it)."""
    state = builtin_state(cfg, seed)
    with torch.device("meta"):
        model = CanonicalModel(cfg, units)
    tensors = {k: state[k].to(device=device, dtype=dtype) for k in model.state_dict()}
    model.load_state_dict(tensors, strict=True, assign=True)
    model.tie_weights()
    return model.eval().requires_grad_(False)
