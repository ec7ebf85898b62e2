"""GEMM selection bookkeeping (CPU): which problems take the path, choices in memory and in the device file.

The cuBLASLt op itself and the timed search run on a GPU: tests/ops/test_gemm_select_cuda.py.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from eet_pipe.ops import gemm_select
from eet_pipe.ops.cuda_graphs import DEFAULT_BUCKETS
from eet_pipe.ops.gemm_select import Choice


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """Device 0 named like an H100, an empty selection, choices filed under tmp_path; restored afterwards."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    gemm_select.clear()
    gemm_select.set_cache_dir(tmp_path)
    yield tmp_path
    gemm_select.set_cache_dir(None)
    gemm_select.clear()


def lt_choice(seed: int = 1) -> Choice:
    return Choice("lt", torch.arange(seed, seed + 64, dtype=torch.uint8), 4096, 7.5, 9.25, 12)


def test_the_selected_rows_are_the_decode_graph_buckets():
    assert gemm_select.SELECT_ROWS == set(DEFAULT_BUCKETS)


def test_cpu_and_unfit_problems_do_not_take_the_path():
    x, w = torch.zeros(8, 64, dtype=torch.float16), torch.zeros(32, 64, dtype=torch.float16)
    assert not gemm_select.fits(x, w, None, None)  # a CPU tensor


def test_a_choice_survives_json_and_bad_entries_are_refused():
    for choice in (lt_choice(), Choice("torch", None, 0, 3.0, 3.0, 5)):
        back = Choice.from_json(json.loads(json.dumps(choice.to_json())))
        assert back.to_json() == choice.to_json()
        assert (back.algo is None) == (choice.algo is None)
        if back.algo is not None:
            assert torch.equal(back.algo, choice.algo) and back.algo.dtype == torch.uint8
    with pytest.raises(ValueError, match="source 'cublas' is not lt or torch"):
        Choice.from_json({**lt_choice().to_json(), "source": "cublas"})
    with pytest.raises(ValueError, match="algo has 3 bytes"):
        Choice.from_json({**lt_choice().to_json(), "algo": "010203"})


def test_choices_are_saved_per_device_and_read_back(fake_gpu):
    gemm_select._device_choices(0)["float16 m=64 n=4800 k=1600 bias=1 residual=0 act=none"] = lt_choice()
    gemm_select._dirty.add(0)
    (path,) = gemm_select.save()
    assert path.parent == fake_gpu and path.name.startswith("gemm_select_nvidia-h100-80gb-hbm3_torch")
    data = json.loads(path.read_text())
    assert data["device"] == "NVIDIA H100 80GB HBM3" and len(data["choices"]) == 1
    assert gemm_select.save() == []  # nothing new
    gemm_select.clear()
    got = gemm_select._device_choices(0)
    assert got["float16 m=64 n=4800 k=1600 bias=1 residual=0 act=none"].to_json() == lt_choice().to_json()
    # a second process's save merges with what the file holds
    gemm_select.clear()
    gemm_select._device_choices(0)  # reads the file
    gemm_select._choices[0] = {"float16 m=8 n=1600 k=1600 bias=1 residual=1 act=none": lt_choice(5)}
    gemm_select._dirty.add(0)
    gemm_select.save()
    assert len(json.loads(path.read_text())["choices"]) == 2


@pytest.mark.parametrize("text", ["{not json", '{"choices": []}', '{"choices": {"k": {"source": "lt"}}}'])
def test_a_corrupt_file_is_ignored_with_a_warning(fake_gpu, caplog, text):
    path = gemm_select.cache_path(0)
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="eet_pipe.ops.gemm_select"):
        assert gemm_select._device_choices(0) == {}
    assert "ignoring" in caplog.text and "measured again" in caplog.text


def test_a_shape_measured_here_is_not_replaced_by_an_older_file_entry(fake_gpu):
    key = "float16 m=64 n=4800 k=1600 bias=1 residual=0 act=none"
    gemm_select._device_choices(0)[key] = lt_choice(1)
    gemm_select._dirty.add(0)
    gemm_select.save()
    gemm_select._choices[0][key] = lt_choice(7)  # measured again in this process
    gemm_select.set_cache_dir(fake_gpu)  # the file is read again on next use
    assert gemm_select._device_choices(0)[key].to_json() == lt_choice(7).to_json()


def test_an_algorithm_that_fails_is_dropped_and_the_call_runs_plain(fake_gpu, monkeypatch, caplog):
    x, w = torch.zeros(64, 1600, dtype=torch.float16), torch.zeros(4800, 1600, dtype=torch.float16)
    key = "float16 m=64 n=4800 k=1600 bias=0 residual=0 act=none"
    gemm_select._device_choices(0)[key] = lt_choice(3)  # e.g. read from a file another cuBLASLt wrote

    def failing(*args):
        raise RuntimeError("gemm_lt: the matmul failed: CUBLAS_STATUS_NOT_SUPPORTED")

    monkeypatch.setattr(torch.ops.eet_pipe, "gemm_lt", failing, raising=False)
    with caplog.at_level(logging.WARNING, logger="eet_pipe.ops.gemm_select"):
        assert gemm_select.run(x, w, None, None, "none", torch.nn.functional.linear) is None
    assert key not in gemm_select.choices(0) and "measured again" in caplog.text


def test_choice_for_uses_memory_skips_capture_and_measures_new_shapes(fake_gpu, monkeypatch):
    x, w = torch.zeros(64, 1600, dtype=torch.float16), torch.zeros(4800, 1600, dtype=torch.float16)
    b = torch.zeros(4800, dtype=torch.float16)
    searched = []

    def search(*args):
        searched.append(args[:4])
        return lt_choice(9)

    monkeypatch.setattr(gemm_select, "_search", search)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert gemm_select.choice_for(x, w, b, None, "none", torch.nn.functional.linear) is None  # capture: untimed
    assert searched == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    first = gemm_select.choice_for(x, w, b, None, "none", torch.nn.functional.linear)
    again = gemm_select.choice_for(x, w, b, None, "none", torch.nn.functional.linear)
    assert first is again and len(searched) == 1
    assert list(gemm_select.choices(0)) == ["float16 m=64 n=4800 k=1600 bias=1 residual=0 act=none"]
    gemm_select.choice_for(x, w, None, None, "gelu_new", torch.nn.functional.linear)  # another epilogue: a new key
    assert len(searched) == 2
    assert [p.name for p in gemm_select.save()] == [gemm_select.cache_path(0).name]
