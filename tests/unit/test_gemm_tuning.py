"""GEMM tuning configuration: file naming, the CPU no-op, and turning TunableOp on and off (its calls recorded)."""

from __future__ import annotations

import pytest
import torch
from torch.cuda import tunable

from eet_pipe import gemm_tuning, ops
from eet_pipe.gemm_tuning import GemmTuning, disable_gemm_tuning, enable_gemm_tuning, tuning_filename


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Record every TunableOp call instead of changing the process's state."""
    seen: list[tuple] = []
    for name in ("set_filename", "set_max_tuning_iterations", "set_max_tuning_duration", "enable", "tuning_enable",
                 "write_file"):
        # raising=False: write_file is missing from some torch versions (save_tuning looks it up)
        monkeypatch.setattr(tunable, name, lambda *args, _name=name: seen.append((_name, *args)), raising=False)
    monkeypatch.setattr(tunable, "read_file", lambda path: seen.append(("read_file", path)) or True)
    monkeypatch.setattr(tunable, "is_enabled", lambda: False)
    monkeypatch.setattr(tunable, "tuning_is_enabled", lambda: False)
    return seen


def test_the_results_file_is_named_by_device_and_versions():
    name = tuning_filename("NVIDIA H100 80GB HBM3")
    assert name.startswith("tunableop_nvidia-h100-80gb-hbm3_torch")
    assert f"torch{torch.__version__.split('+')[0]}_cuda{torch.version.cuda}.csv" in name or torch.version.hip
    assert tuning_filename("///").startswith("tunableop_device_")


def test_cpu_is_a_no_op_and_bad_iterations_are_refused(calls):
    off = enable_gemm_tuning("cpu")
    assert off.path is None and not off.enabled and "not a CUDA device" in off.why_off
    disable_gemm_tuning(off)
    assert calls == []
    with pytest.raises(ValueError, match="max_iterations=0 is invalid"):
        enable_gemm_tuning("cpu", max_iterations=0)


def test_a_cuda_build_without_the_extension_leaves_tuning_off_with_the_reason(calls, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(ops, "HAVE_EXT", False)
    off = enable_gemm_tuning("cuda:0")
    assert not off.enabled and "CUDA extension is unavailable" in off.why_off
    monkeypatch.setattr(ops, "HAVE_EXT", True)
    monkeypatch.setattr(ops.gemm_select, "ENABLED", False)
    off = enable_gemm_tuning("cuda:0")
    assert not off.enabled and "EET_PIPE_GEMM_SELECT=0" in off.why_off
    assert calls == []  # TunableOp untouched


def test_a_cuda_build_keeps_the_cublaslt_selection_in_a_device_file(calls, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(ops, "HAVE_EXT", True)
    monkeypatch.setattr(ops.gemm_select, "ENABLED", True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    saved = []
    monkeypatch.setattr(ops.gemm_select, "save", lambda: saved.append(ops.gemm_select.cache_path(0)) or [])
    on = enable_gemm_tuning("cuda:0", tmp_path / "sel")
    try:
        assert on.enabled and on.backend == "cublaslt" and not on.loaded
        assert on.path == tmp_path / "sel" / on.path.name and on.path.parent.is_dir()
        assert on.path.name.startswith("gemm_select_nvidia-h100-80gb-hbm3_torch") and on.path.suffix == ".json"
        assert ops.gemm_select.cache_path(0) == on.path
    finally:
        disable_gemm_tuning(on)
    assert saved == [on.path]  # saved while the file was still set
    assert ops.gemm_select.cache_path(0) is None  # then no file
    assert calls == []  # TunableOp untouched


def test_enable_reads_the_device_file_and_disable_saves_it_and_turns_tuning_off(calls, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2")  # a ROCm build, where TunableOp has candidates
    assert tuning_filename("AMD Instinct MI300X").endswith("_rocm6.2.csv")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "AMD Instinct MI300X")
    path = tmp_path / tuning_filename("AMD Instinct MI300X")
    path.write_text("earlier results")
    on = enable_gemm_tuning("cuda:0", tmp_path, max_iterations=7)
    assert on.enabled and on.path == path and on.loaded
    assert ("set_filename", str(path), False) in calls and ("set_max_tuning_iterations", 7) in calls
    assert calls.index(("set_filename", str(path), False)) < calls.index(("enable", True))  # file set first
    assert ("tuning_enable", True) in calls and ("read_file", str(path)) in calls
    calls.clear()
    disable_gemm_tuning(on)
    assert calls == [("write_file", str(path)), ("tuning_enable", False), ("enable", False)]


def test_disable_leaves_a_tuning_that_is_off_alone(calls):
    disable_gemm_tuning(GemmTuning(torch.device("cuda", 0), None))
    assert calls == []
    assert "disable_gemm_tuning" in gemm_tuning.__all__


def test_disable_restores_what_was_on_before(calls, tmp_path):
    """TunableOp already on (PYTORCH_TUNABLEOP_ENABLED=1) stays on after our tuning is done with."""
    path = tmp_path / "results.csv"
    disable_gemm_tuning(GemmTuning(torch.device("cuda", 0), path, before=(True, False)))
    assert calls == [("write_file", str(path)), ("tuning_enable", False), ("enable", True)]
