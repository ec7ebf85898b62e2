"""One meaning per name: `weights_seed` seeds random weights, `seed` (`sample_seed` on the `generate` command
line) seeds sampling; the old `seed=` for the weights still works for one release, with a warning naming
`weights_seed=`. And `eet-pipe generate`'s sampling options are `SamplingParams`' fields, declared once."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from eet_pipe import from_pretrained
from eet_pipe.cli import main as cli_main
from eet_pipe.compare.cli import _options as compare_options
from eet_pipe.compare.core import Side
from eet_pipe.generation.sequences import SamplingParams
from eet_pipe.loading.presets import SEED_RENAMED, resolve_model
from eet_pipe.options.parse import build_config, field_docs
from eet_pipe.options.typed import SAMPLING_NAMES, EngineOptions, GenerateOptions
from eet_pipe.runtime.engine import PipelineEngine
from eet_pipe.serve import main as serve_main
from eet_pipe.serving.serve_options import ServeOptions


def _warned(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_the_warning_names_the_new_spelling():
    assert "use weights_seed=" in SEED_RENAMED and SEED_RENAMED.startswith("seed= is the weights' seed")


@pytest.mark.parametrize("cls", [EngineOptions, ServeOptions, GenerateOptions])
def test_options_read_weights_seed_silently(cls, caplog):
    with caplog.at_level(logging.WARNING):
        assert build_config(cls, {"weights_seed": "5"}).weights_seed == 5
    assert not _warned(caplog)
    assert not hasattr(cls(), "seed")


@pytest.mark.parametrize("cls", [EngineOptions, ServeOptions, GenerateOptions])
def test_options_read_the_old_seed_as_the_weights_seed_and_warn(cls, caplog):
    with caplog.at_level(logging.WARNING):
        opts = build_config(cls, {"seed": "5"})
    assert opts.weights_seed == 5
    assert _warned(caplog) == [SEED_RENAMED]


def test_generate_options_keep_the_two_seeds_apart(caplog):
    with caplog.at_level(logging.WARNING):
        opts = build_config(GenerateOptions, {"weights_seed": "3", "sample_seed": "9", "temperature": "0.5"})
    assert not _warned(caplog)
    assert (opts.weights_seed, opts.sampling().seed, opts.sampling().temperature) == (3, 9, 0.5)
    assert build_config(GenerateOptions, {"seed": "4"}).sampling().seed is None  # the old key never seeds sampling


def test_generate_options_declare_every_sampling_field_once():
    """Each `SamplingParams` field is an option with its default and docstring; `sampling()` maps them back."""
    cli = {f.name: f for f in dataclasses.fields(GenerateOptions)}
    docs, cli_docs = field_docs(SamplingParams), field_docs(GenerateOptions)
    for f in dataclasses.fields(SamplingParams):
        name = SAMPLING_NAMES.get(f.name, f.name)
        assert name in cli, name
        assert getattr(GenerateOptions(), name) == getattr(SamplingParams(), f.name)
        assert cli_docs[name] == docs[f.name] and docs[f.name]
    assert GenerateOptions().sampling() == SamplingParams()
    opts = build_config(GenerateOptions, {"max_new_tokens": "7", "top_k": "3", "top_p": "0.5", "stop": "a,b",
                                          "ignore_eos": "true", "sample_seed": "11", "temperature": "1"})
    assert opts.sampling() == SamplingParams(max_new_tokens=7, temperature=1.0, top_k=3, top_p=0.5, seed=11,
                                             stop=["a", "b"], ignore_eos=True)
    with pytest.raises(ValueError, match="top_p=2.0 is invalid"):
        build_config(GenerateOptions, {"top_p": "2"}).sampling()


def test_generate_help_lists_weights_seed_and_every_sampling_field(capsys):
    with pytest.raises(SystemExit):
        cli_main(["generate", "--help"])
    out = capsys.readouterr().out
    names = [line.split("=")[0].strip() for line in out.splitlines() if "=" in line and line.startswith("  ")]
    assert "weights_seed" in names and "seed" not in names
    for f in dataclasses.fields(SamplingParams):
        assert SAMPLING_NAMES.get(f.name, f.name) in names, f.name
    assert "Seed of random weights" in out and "Seed of this request's random generator" in out


def test_serve_help_lists_weights_seed(capsys):
    with pytest.raises(SystemExit):
        serve_main(["--help"])
    names = [line.split("=")[0].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert "weights_seed" in names and "seed" not in names


def _weights(lm) -> dict[str, torch.Tensor]:
    return lm.model.state_dict()


def test_from_pretrained_weights_seed_and_the_old_seed(recwarn):
    three = from_pretrained("tiny", "random", weights_seed=3)
    assert three.spec.weights_seed == 3 and not [w for w in recwarn if issubclass(w.category, FutureWarning)]
    four = from_pretrained("tiny", "random", weights_seed=4)
    assert any(not torch.equal(a, b) for a, b in zip(_weights(three).values(), _weights(four).values(), strict=True))
    with pytest.warns(FutureWarning, match="use weights_seed=") as caught:
        old = from_pretrained("tiny", "random", seed=3)
    assert caught[0].filename == __file__  # the warning points at the caller
    assert old.spec.weights_seed == 3
    assert all(torch.equal(a, b) for a, b in zip(_weights(three).values(), _weights(old).values(), strict=True))
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="weights_seed=4 and seed=3 disagree"):
        from_pretrained("tiny", "random", weights_seed=4, seed=3)


def test_pipeline_engine_weights_seed_and_the_old_seed(monkeypatch, recwarn):
    monkeypatch.setattr(PipelineEngine, "_start", lambda self, timeout, startup_timeout: None)  # no worker processes
    engine = PipelineEngine("tiny", devices=["cpu"], plan="even", weights="random", weights_seed=6)
    assert engine.spec.weights_seed == 6 and not [w for w in recwarn if issubclass(w.category, FutureWarning)]
    with pytest.warns(FutureWarning, match="seed= is the weights' seed here for one more release; use weights_seed="):
        engine = PipelineEngine("tiny", devices=["cpu"], plan="even", weights="random", seed=7)
    assert engine.spec.weights_seed == 7
    opts = build_config(EngineOptions, {"weights": "random", "weights_seed": "8", "plan": "even"})
    assert PipelineEngine.from_options(opts).spec.weights_seed == 8


def test_resolve_model_and_compare_sides_take_weights_seed(caplog):
    assert resolve_model("tiny", "random", weights_seed=5).weights_seed == 5
    side = Side.parse("eet:dtype=fp32", "tiny", "random", weights_seed=5)
    assert side.weights_seed == 5 and "weights_seed=5" in side.label + repr(side)
    args = compare_options(["model=tiny", "ids=1,2", "weights_seed=4"])
    assert args.weights_seed == 4 and not _warned(caplog)
    with caplog.at_level(logging.WARNING):
        args = compare_options(["model=tiny", "ids=1,2", "seed=6"])
    assert args.weights_seed == 6 and _warned(caplog) == [SEED_RENAMED]
    with caplog.at_level(logging.WARNING):
        assert compare_options(["--model", "tiny", "--ids", "1", "--seed", "2"]).weights_seed == 2
