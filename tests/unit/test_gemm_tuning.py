"""GEMM tuning (CPU): where the results file goes, what it is called, and that what one process stores is read
back and used by the next.

CUDA builds run `eet_pipe.ops.gemm_select` for real here, with only the GPU-timed search replaced by a fixed
measurement and the cuBLASLt op by one that records the algorithm it is given. ROCm builds run against a model of
TunableOp's process state and its results file. The timed search itself: tests/ops/test_gemm_select_cuda.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch.cuda import tunable

from eet_pipe import ops
from eet_pipe.ops import gemm_select
from eet_pipe.ops.gemm_select import Choice
from eet_pipe.ops.gemm_tuning import (
    MAX_TUNING_MS,
    GemmTuning,
    default_cache_dir,
    disable_gemm_tuning,
    enable_gemm_tuning,
    save_tuning,
    tuning_filename,
)

GPUS = {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA H200"}
QKV = "float16 m=8 n=4800 k=1600 bias=1 residual=0 act=none"
"""The selection key of `qkv_problem()`."""


def qkv_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [8, 1600], weight [4800, 1600], bias: GPT-2 XL's qkv projection at batch 8."""
    return (torch.zeros(8, 1600, dtype=torch.float16), torch.zeros(4800, 1600, dtype=torch.float16),
            torch.zeros(4800, dtype=torch.float16))


def lt_choice(seed: int) -> Choice:
    return Choice("lt", torch.arange(seed, seed + 64, dtype=torch.uint8), 1024 * seed, 5.0, 6.5, 12)


@pytest.fixture
def cuda_build(monkeypatch: pytest.MonkeyPatch):
    """A CUDA 12.4 build of torch 2.11.0 with the extension and cuBLASLt 120400, GPUs as in `GPUS` (cuda:0 current);
    the selection empty and without a folder before and after."""
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu124")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(ops, "HAVE_EXT", True)
    monkeypatch.setattr(gemm_select, "ENABLED", True)
    monkeypatch.setattr(gemm_select, "_cublaslt_version", lambda: 120400)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: GPUS[0 if device is None else device])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    gemm_select.set_cache_dir(None)
    gemm_select.clear()
    yield monkeypatch
    gemm_select.set_cache_dir(None)
    gemm_select.clear()


class Gpu:
    """What the GPU would do: `measure` is the timed search's result for each new shape, `ran` the cuBLASLt
    algorithms (as bytes) the op was called with."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, measure: Choice | None):
        self.measure, self.searched, self.ran = measure, 0, []
        monkeypatch.setattr(gemm_select, "_search", self._search)
        monkeypatch.setattr(torch.ops.eet_pipe, "gemm_lt", self._gemm_lt, raising=False)

    def _search(self, x, weight, bias, residual, activation, plain) -> Choice:
        if self.measure is None:
            raise AssertionError("a stored shape was measured again")
        self.searched += 1
        return self.measure

    def _gemm_lt(self, x, weight, bias, residual, activation, algo, workspace) -> torch.Tensor:
        self.ran.append((None if algo is None else bytes(algo.tolist()), workspace))
        return torch.zeros(x.shape[0], weight.shape[0], dtype=x.dtype)

    def linear(self) -> torch.Tensor | None:
        """`gemm_select.run` on the qkv problem: the output, or None where the plain path is to run."""
        x, w, b = qkv_problem()
        return gemm_select.run(x, w, b, None, "none", torch.nn.functional.linear)


def new_process() -> None:
    """What a fresh process starts from: no choices in memory, no folder."""
    gemm_select.set_cache_dir(None)
    gemm_select.clear()


def test_file_names_carry_the_gpu_and_every_version_an_algorithm_depends_on(cuda_build, tmp_path):
    assert tuning_filename("NVIDIA H100 80GB HBM3") == "tunableop_nvidia-h100-80gb-hbm3_torch2.11.0_cuda12.4.csv"
    assert tuning_filename("///") == "tunableop_device_torch2.11.0_cuda12.4.csv"
    cuda_build.setattr(torch.version, "hip", "6.2")
    assert tuning_filename(" AMD Instinct MI300X ") == "tunableop_amd-instinct-mi300x_torch2.11.0_rocm6.2.csv"
    cuda_build.setattr(torch.version, "hip", None)
    on = enable_gemm_tuning("cuda:0", tmp_path)
    assert on.path == tmp_path / "gemm_select_nvidia-h100-80gb-hbm3_torch2.11.0_cuda12.4_cublaslt120400.json"
    cuda_build.setattr(gemm_select, "_cublaslt_version", lambda: 120500)  # another cuBLASLt: another file
    assert gemm_select.cache_path(0).name.endswith("_cuda12.4_cublaslt120500.json")
    assert gemm_select.cache_path(1).name.startswith("gemm_select_nvidia-h200_torch2.11.0_")


def test_cpu_turns_nothing_on_and_writes_nothing(cuda_build, tmp_path):
    off = enable_gemm_tuning("cpu", tmp_path / "results")
    assert not off.enabled and off.path is None and not off.loaded and "cpu is not a CUDA device" in off.why_off
    save_tuning(off)
    disable_gemm_tuning(off)
    assert not (tmp_path / "results").exists() and gemm_select.cache_path(0) is None
    for device in ("cpu", "cuda:0"):
        with pytest.raises(ValueError, match="max_iterations=0 is invalid: must be >= 1"):
            enable_gemm_tuning(device, tmp_path, max_iterations=0)


@pytest.mark.parametrize("missing", ["extension", "selection"])
def test_without_the_extension_or_the_selection_tuning_is_off_with_the_reason(cuda_build, tmp_path, missing):
    if missing == "extension":
        cuda_build.setattr(ops, "HAVE_EXT", False)
        cuda_build.setattr(ops, "EXT_REASON", "no compiled eet_pipe._C")
    else:
        cuda_build.setattr(gemm_select, "ENABLED", False)
    off = enable_gemm_tuning("cuda:0", tmp_path / "results")
    assert not off.enabled and off.path is None
    reason = "CUDA extension is unavailable (no compiled eet_pipe._C)" if missing == "extension" else \
        "EET_PIPE_GEMM_SELECT=0"
    assert reason in off.why_off
    assert not (tmp_path / "results").exists() and gemm_select.cache_path(0) is None


def test_the_default_folder_is_in_the_home_cache_and_a_device_without_index_is_the_current_one(cuda_build, tmp_path):
    cuda_build.setenv("HOME", str(tmp_path))
    cuda_build.setattr(torch.cuda, "current_device", lambda: 1)
    on = enable_gemm_tuning("cuda")
    assert default_cache_dir() == tmp_path / ".cache" / "eet_pipe" / "gemm_tuning"
    assert on.path.parent == default_cache_dir() and default_cache_dir().is_dir()
    assert on.path.name.startswith("gemm_select_nvidia-h200_")


def test_a_choice_is_written_then_read_back_and_used_by_the_next_process(cuda_build, tmp_path):
    folder = tmp_path / "gemm"
    gpu = Gpu(cuda_build, measure=lt_choice(3))
    first = enable_gemm_tuning("cuda:0", folder)
    assert first.enabled and first.backend == "cublaslt" and not first.loaded and folder.is_dir()
    assert gpu.linear() is not None and gpu.searched == 1
    assert gpu.ran == [(bytes(range(3, 67)), 3072)]  # the measured winner ran
    save_tuning(first)
    stored = json.loads(first.path.read_text())
    assert stored["device"] == GPUS[0] and stored["cublaslt"] == 120400 and stored["torch"] == "2.11.0+cu124"
    assert stored["choices"] == {QKV: lt_choice(3).to_json()}
    disable_gemm_tuning(first)
    assert gemm_select.cache_path(0) is None and first.path.exists()

    new_process()
    gpu = Gpu(cuda_build, measure=None)  # measuring again would fail the test
    second = enable_gemm_tuning("cuda:0", folder)
    assert second.path == first.path and second.loaded
    assert gpu.linear() is not None
    assert gpu.ran == [(bytes(range(3, 67)), 3072)]  # the stored algorithm and workspace, not cuBLASLt's default


def test_a_stored_plain_choice_sends_the_call_to_the_plain_path(cuda_build, tmp_path):
    gpu = Gpu(cuda_build, measure=Choice("torch", None, 0, 9.0, 9.0, 12))  # F.linear measured fastest
    on = enable_gemm_tuning("cuda:0", tmp_path)
    assert gpu.linear() is None and gpu.ran == []
    disable_gemm_tuning(on)  # saves
    new_process()
    gpu = Gpu(cuda_build, measure=None)
    assert enable_gemm_tuning("cuda:0", tmp_path).loaded
    assert gpu.linear() is None and gpu.ran == []  # read back: the plain path, no cuBLASLt call


def test_each_process_adds_its_shapes_to_the_file(cuda_build, tmp_path):
    gpu = Gpu(cuda_build, measure=lt_choice(1))
    on = enable_gemm_tuning("cuda:0", tmp_path)
    gpu.linear()
    save_tuning(on)
    new_process()
    gpu = Gpu(cuda_build, measure=lt_choice(2))
    on = enable_gemm_tuning("cuda:0", tmp_path)
    x = torch.zeros(16, 1600, dtype=torch.float16)
    gemm_select.run(x, torch.zeros(1600, 1600, dtype=torch.float16), None, None, "none", torch.nn.functional.linear)
    disable_gemm_tuning(on)  # saves
    assert json.loads(on.path.read_text())["choices"] == {
        QKV: lt_choice(1).to_json(), "float16 m=16 n=1600 k=1600 bias=0 residual=0 act=none": lt_choice(2).to_json()}


@pytest.mark.parametrize("text", ["{not json", '{"choices": []}', '{"choices": {"k": {"source": "lt"}}}', ""])
def test_a_corrupt_file_is_measured_again_and_replaced(cuda_build, tmp_path, caplog, text):
    gpu = Gpu(cuda_build, measure=lt_choice(4))
    on = enable_gemm_tuning("cuda:0", tmp_path)
    on.path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="eet_pipe.ops.gemm_select"):
        assert gpu.linear() is not None
    assert "ignoring" in caplog.text and gpu.searched == 1
    disable_gemm_tuning(on)
    assert json.loads(on.path.read_text())["choices"] == {QKV: lt_choice(4).to_json()}


@pytest.mark.xfail(strict=True, reason="GemmTuning.loaded is path.exists(): a file with no readable choice counts")
def test_loaded_is_false_for_a_file_with_no_readable_choice(cuda_build, tmp_path):
    enable_gemm_tuning("cuda:0", tmp_path).path.write_text("{not json")
    new_process()
    assert not enable_gemm_tuning("cuda:0", tmp_path).loaded


class TunableOpModel:
    """TunableOp's process-wide state and results file, as torch.cuda.tunable documents them: a CSV of
    ``op,params,solution,ms`` lines after ``Validator`` lines; a tunable GEMM loads the file named at its first
    call, runs the stored solution of its (op, params), or tunes one when tuning is on and keeps it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, enabled: bool = False, tuning: bool = False):
        self.enabled, self.tuning, self.filename = enabled, tuning, ""
        self.max_iterations, self.max_ms, self.results, self.loaded = 100, 30, {}, False
        monkeypatch.setattr(tunable, "is_enabled", lambda: self.enabled)
        monkeypatch.setattr(tunable, "tuning_is_enabled", lambda: self.tuning)
        monkeypatch.setattr(tunable, "enable", lambda val=True: setattr(self, "enabled", val))
        monkeypatch.setattr(tunable, "tuning_enable", lambda val=True: setattr(self, "tuning", val))
        monkeypatch.setattr(tunable, "set_filename", lambda name, ordinal=False: setattr(self, "filename", name))
        monkeypatch.setattr(tunable, "set_max_tuning_iterations", lambda n: setattr(self, "max_iterations", n))
        monkeypatch.setattr(tunable, "set_max_tuning_duration", lambda ms: setattr(self, "max_ms", ms))
        monkeypatch.setattr(tunable, "read_file", self.read_file)
        monkeypatch.setattr(tunable, "write_file", self.write_file, raising=False)

    def read_file(self, filename: str | None = None) -> bool:
        path = Path(filename or self.filename)
        if not path.exists():
            return False
        for line in path.read_text().splitlines():
            op, params, solution = line.split(",")[:3]
            if op != "Validator":
                self.results[(op, params)] = solution
        self.loaded = True
        return True

    def write_file(self, filename: str | None = None) -> bool:
        lines = ["Validator,PT_VERSION,2.11.0"] + [f"{op},{p},{s},0.01" for (op, p), s in self.results.items()]
        Path(filename or self.filename).write_text("\n".join(lines) + "\n")
        return True

    def gemm(self, params: str) -> str:
        """The solution one fp16 tunable GEMM of these params runs."""
        if not self.enabled:
            return "Default"
        if not self.loaded:
            self.read_file()
        key = ("GemmTunableOp_Half_TN", params)
        if key not in self.results and self.tuning:
            self.results[key] = f"Gemm_Hipblaslt_{len(self.results) + 1000}"
        return self.results.get(key, "Default")


@pytest.fixture
def rocm_build(cuda_build):
    cuda_build.setattr(torch.version, "hip", "6.2")
    cuda_build.setattr(torch.cuda, "get_device_name", lambda device=None: "AMD Instinct MI300X")
    return cuda_build


def test_rocm_reads_the_device_file_uses_it_tunes_the_rest_and_writes_both(rocm_build, tmp_path):
    path = tmp_path / "tunableop_amd-instinct-mi300x_torch2.11.0_rocm6.2.csv"
    path.write_text("Validator,PT_VERSION,2.11.0\nGemmTunableOp_Half_TN,tn_4800_1_1600,Gemm_Hipblaslt_77,0.0085\n")
    op = TunableOpModel(rocm_build)
    on = enable_gemm_tuning("cuda:0", tmp_path, max_iterations=7)
    assert on.enabled and on.backend == "tunableop" and on.path == path and on.loaded
    assert (op.enabled, op.tuning, op.filename, op.max_iterations, op.max_ms) == (True, True, str(path), 7,
                                                                                  MAX_TUNING_MS)
    assert op.gemm("tn_4800_1_1600") == "Gemm_Hipblaslt_77"  # read back and used
    assert op.gemm("tn_1600_64_6400") == "Gemm_Hipblaslt_1001"  # a new shape is tuned
    disable_gemm_tuning(on)
    assert (op.enabled, op.tuning) == (False, False)  # as before: the BLAS library's heuristics again
    assert op.gemm("tn_4800_1_1600") == "Default"

    op = TunableOpModel(rocm_build)  # the next process
    assert enable_gemm_tuning("cuda:0", tmp_path).loaded
    assert [op.gemm("tn_4800_1_1600"), op.gemm("tn_1600_64_6400")] == ["Gemm_Hipblaslt_77", "Gemm_Hipblaslt_1001"]


def test_rocm_restores_tunableop_that_was_on_before(rocm_build, tmp_path):
    """TunableOp already on (PYTORCH_TUNABLEOP_ENABLED=1) stays on, without tuning, once ours is done with."""
    op = TunableOpModel(rocm_build, enabled=True)
    on = enable_gemm_tuning("cuda:0", tmp_path)
    assert not on.loaded and (op.enabled, op.tuning) == (True, True)
    op.gemm("tn_1600_1_1600")
    disable_gemm_tuning(on)
    assert (op.enabled, op.tuning) == (True, False) and "tn_1600_1_1600,Gemm_Hipblaslt_1000" in on.path.read_text()


def test_rocm_without_write_file_keeps_the_results_for_exit_and_an_off_tuning_changes_nothing(rocm_build, tmp_path):
    op = TunableOpModel(rocm_build)
    rocm_build.delattr(tunable, "write_file")  # some torch versions write only at exit
    on = enable_gemm_tuning("cuda:0", tmp_path)
    op.gemm("tn_1600_1_1600")
    save_tuning(on)
    assert not on.path.exists() and op.results
    disable_gemm_tuning(GemmTuning(torch.device("cuda", 0), None))
    assert (op.enabled, op.tuning) == (True, True)
