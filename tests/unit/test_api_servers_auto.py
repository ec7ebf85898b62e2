"""`api_servers=0` (the default) decides the number of HTTP processes from where the stages run."""

import os
import sys

import pytest

from eet_pipe.serving import serve_options
from eet_pipe.serving.serve_options import AUTO_API_SERVERS, ServeOptions

linux_only = pytest.mark.skipif(not serve_options.port_sharing(), reason="needs SO_REUSEPORT (Linux)")


@pytest.fixture
def cores(monkeypatch):
    def set_cores(n: int) -> None:
        monkeypatch.setattr(serve_options, "_usable_cores", lambda: n)

    return set_cores


@linux_only
def test_gpu_stages_with_a_port_and_cores_get_several_http_processes(cores):
    cores(16)
    assert ServeOptions().resolve_api_servers(on_gpus=True).api_servers == AUTO_API_SERVERS > 1


@pytest.mark.parametrize("on_gpus, port, n_cores", [(False, 8000, 16), (True, 0, 16), (True, 8000, 4)])
def test_cpu_stages_an_arbitrary_port_or_few_cores_get_one(cores, on_gpus, port, n_cores):
    cores(n_cores)
    assert ServeOptions(port=port).resolve_api_servers(on_gpus=on_gpus).api_servers == 1


def test_without_port_sharing_auto_is_one(cores, monkeypatch):
    cores(64)
    monkeypatch.setattr(serve_options, "port_sharing", lambda: False)
    assert ServeOptions().resolve_api_servers(on_gpus=True).api_servers == 1


@pytest.mark.parametrize("n", [1, pytest.param(3, marks=linux_only)])
def test_an_explicit_count_is_kept(cores, n):
    cores(1)
    assert ServeOptions(api_servers=n).resolve_api_servers(on_gpus=False).api_servers == n


def test_resolving_keeps_every_other_option(cores):
    cores(1)
    opts = ServeOptions(port=1234, max_slots=7, api_key="k")
    resolved = opts.resolve_api_servers(on_gpus=False)
    assert (resolved.port, resolved.max_slots, resolved.api_key, resolved.api_servers) == (1234, 7, "k", 1)
    assert opts.api_servers == 0


def test_max_connections_must_cover_the_auto_count():
    with pytest.raises(ValueError, match="max_connections=1 is invalid"):
        ServeOptions(max_connections=1)
    assert ServeOptions(api_servers=1, max_connections=1).max_connections == 1


def test_usable_cores_counts_this_process_affinity():
    n = serve_options._usable_cores()
    assert 1 <= n <= (os.cpu_count() or 1)
    if sys.platform.startswith("linux"):
        assert n == len(os.sched_getaffinity(0))
