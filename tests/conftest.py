"""Shared fixtures: tiny HF reference models saved locally, and GPU markers."""

from __future__ import annotations

import os

os.environ.setdefault("MKL_DYNAMIC", "FALSE")  # fixed thread split: CPU results reproducible bit for bit
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")  # and independent of buffer alignment (differs across processes)

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.hf_models import make_bert, make_gpt2, make_llama  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    for item in items:
        if "cuda" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multigpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs two or more CUDA GPUs"))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory):
    """GPT-2 with 25 heads of 20 (hidden 500), saved as model.safetensors."""
    path = tmp_path_factory.mktemp("gpt2")
    make_gpt2().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory):
    """LLaMA with grouped-query attention 8:2 (4:1), head dim 20, rotary."""
    path = tmp_path_factory.mktemp("llama")
    make_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory: pytest.TempPathFactory):
    """BERT encoder with pooler, 5 heads of 16."""
    path = tmp_path_factory.mktemp("bert")
    make_bert().save_pretrained(path)
    return path
