"""The driver's view of the stages' padding. `warmup_shapes`: the step shapes a server's graph warm-up runs are
exactly the padded shapes its scheduler can send to a GPU stage that graphs them (checked against a brute-force
walk over every part size). `prompt_padding`: the shape a stage runs a prompt part in."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from eet_pipe.runtime.step_parts import (
    PAD_ENV,
    PREFILL_GRAPH_ELEMENTS,
    PREFILL_GRAPH_TOKENS,
    prefill_width,
    step_rows,
)
from eet_pipe.serving.driver import WARMUP_GRAPHS, prompt_padding, warmup_shapes


def _setup(hidden: int, slots: int, groups: int, max_len: int, budget: int = 4096, chunks: int = 1) -> SimpleNamespace:
    stages = [SimpleNamespace(chunks=[("a", "b")] * chunks)] * 2
    return SimpleNamespace(cfg=SimpleNamespace(hidden_size=hidden), max_slots=slots, groups=groups, max_len=max_len,
                           max_prefill_tokens=budget, plan=SimpleNamespace(stages=stages))


@pytest.mark.parametrize("args", [(1600, 256, 2, 192), (1600, 200, 2, 40), (64, 8, 2, 128), (4096, 96, 4, 700),
                                  (1600, 256, 2, 300, 1000), (8192, 64, 4, 2000)])
def test_the_shapes_are_every_graphed_shape_the_scheduler_can_build(args) -> None:
    setup = _setup(*args)
    rows, prompts = warmup_shapes(setup)
    per_group = -(-setup.max_slots // setup.groups)
    graphed = min(PREFILL_GRAPH_TOKENS, PREFILL_GRAPH_ELEMENTS // setup.cfg.hidden_size)
    reachable = {(step_rows(r), prefill_width(w, setup.max_len))
                 for r in range(1, per_group + 1) for w in range(2, setup.max_len - 1)
                 if (r == 1 or r * w <= setup.max_prefill_tokens)
                 and step_rows(r) * prefill_width(w, setup.max_len) <= graphed}
    padded = [(step_rows(r), prefill_width(w, setup.max_len)) for r, w in prompts]
    assert sorted(padded) == sorted(reachable) and len(set(padded)) == len(padded)
    assert all(w + 2 <= setup.max_len and (r == 1 or r * w <= setup.max_prefill_tokens) for r, w in prompts)
    assert sorted(step_rows(r) for r in rows) == sorted({step_rows(r) for r in range(1, per_group + 1)})
    assert all(r <= per_group for r in rows) and len(set(map(step_rows, rows))) == len(rows)


def test_gpt2_xl_serving_defaults() -> None:
    rows, prompts = warmup_shapes(_setup(1600, 256, 2, 192))
    assert rows == [1, 2, 3, 5, 9, 17, 33, 65]  # the fewest rows of each bucket up to 128 per group
    assert (1, 129) in prompts and (65, 2) in prompts and (65, 17) in prompts and (33, 97) not in prompts
    assert len(prompts) == 47


def test_shapes_beyond_the_graph_budget_keep_the_smallest_parts() -> None:
    setup = _setup(1600, 256, 2, 1024, chunks=2)  # two chunks per stage: every shape is two graphs
    rows, prompts = warmup_shapes(setup)
    full_rows, full = warmup_shapes(_setup(1600, 256, 2, 1024))
    assert rows == full_rows and 2 * (len(rows) + len(prompts)) <= WARMUP_GRAPHS < 2 * (len(rows) + len(full))
    size = {(r, w): step_rows(r) * prefill_width(w, 1024) for r, w in full}
    assert set(prompts) <= set(full) and max(size[p] for p in prompts) <= min(size[p] for p in set(full) - set(prompts))


def test_prompt_padding_is_the_stages_bucket_shape_where_they_pad_and_none_elsewhere(monkeypatch):
    monkeypatch.delenv(PAD_ENV, raising=False)

    def setup(devices: list[str], graphs: bool = True, hidden: int = 1600) -> SimpleNamespace:
        return SimpleNamespace(cuda_graphs=graphs, plan=SimpleNamespace(devices=devices),
                               cfg=SimpleNamespace(hidden_size=hidden), max_len=192)

    assert prompt_padding(setup(["cpu", "cpu"])) is None
    assert prompt_padding(setup(["cuda:0", "cpu"])) is None  # the CPU stage runs parts as they are
    assert prompt_padding(setup(["cuda:0"], graphs=False)) is None
    pad = prompt_padding(setup(["cuda:0", "cuda:1"]))
    assert pad(35, 64) == (64, 64) and pad(3, 17) == (4, 32) and pad(1, 150) == (1, 192)
    assert pad(129, 1) == (256, 1)  # one-token prompts run as a decode part: rows bucketed, no width
    assert pad(72, 64) == (72, 64)  # 128 x 64 tokens exceed the graphed size: run eagerly, as it is
    assert prompt_padding(setup(["cuda:0"], hidden=8192))(17, 64) == (17, 64)  # 8192 wide: 1024 graphed tokens
    monkeypatch.setenv(PAD_ENV, "1")
    assert prompt_padding(setup(["cpu"]))(5, 10) == (8, 16)
