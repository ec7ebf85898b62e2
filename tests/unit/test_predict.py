"""`eet-pipe predict`: a measured profile balanced and simulated on hypothetical pipelines."""

from __future__ import annotations

import json

import pytest

from eet_pipe.cli import main
from eet_pipe.partition.costs import UnitCost
from eet_pipe.partition.predict import Cluster, cluster_links, predict_scaling
from eet_pipe.partition.profile import Profile, Workload

ACT = 2 * 512 * 1600 * 2  # bytes of one 2 x 512 fp16 hidden state


def _profile() -> Profile:
    units = [UnitCost("embed", 1e-5, 10**8, ACT)]
    units += [UnitCost(f"layers.{i}", 1e-4, 6 * 10**7, ACT, 600_000) for i in range(24)]
    units += [UnitCost("head", 3e-4, 1.6 * 10**8, 0)]
    return Profile("synthetic@0/H200/fp16/prefill-2x512", units, "H200", "fp16", Workload("prefill", 2, 512))


def test_links_are_fast_inside_a_node_and_slow_between():
    links = cluster_links(4, Cluster(gpus_per_node=2, intra_gbps=300, inter_gbps=25))
    assert links.kind[0][1] == "NVLINK" and links.kind[1][2] == "NET" and links.kind[2][2] == "SELF"
    assert links.bandwidth[0][1] == 300e9 and links.bandwidth[1][2] == 25e9


def test_gpipe_prediction_follows_the_bubble_and_the_network():
    prof = _profile()
    fast = predict_scaling(prof, [1, 2, 4], "gpipe", 16, cluster=Cluster(gpus_per_node=2, inter_gbps=400))
    assert [p.stages for p in fast] == [1, 2, 4] and fast[0].speedup == pytest.approx(1.0)
    for p in fast[1:]:
        bound = p.stages * 16 / (16 + p.stages - 1)
        assert p.speedup <= bound + 1e-9 and p.efficiency == pytest.approx(p.speedup / p.stages)
        assert sum(p.units_per_chunk) == len(prof.units)
    assert fast[1].speedup > 1.6 and fast[2].speedup > fast[1].speedup
    slow = predict_scaling(prof, [4], "gpipe", 16, cluster=Cluster(gpus_per_node=2, inter_gbps=0.05))[0]
    assert slow.nodes == 2 and slow.speedup < fast[2].speedup * 0.8  # 3.3 MB over 50 MB/s per microbatch
    inter = predict_scaling(prof, [4], "interleaved", 16, virtual=2, cluster=Cluster(inter_gbps=400))[0]
    assert len(inter.units_per_chunk) == 8


def test_predict_command_prints_the_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "profile.json"
    _profile().to_json(path)
    out = tmp_path / "pred.json"
    assert main(["predict", f"profile={path}", "stages=1,2,8", "microbatches=8", "gpus_per_node=4",
                 f"out={out}"]) == 0
    text = capsys.readouterr().out
    assert "synthetic@0/H200" in text and "4 GPUs/node" in text
    rows = [ln.split() for ln in text.splitlines() if ln.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "8"] and rows[2][1] == "2"  # 8 stages span two nodes
    data = json.loads(out.read_text())
    assert [p["stages"] for p in data["points"]] == [1, 2, 8]


@pytest.mark.parametrize("args,msg", [
    (["stages=2"], "profile= is required"),
    (["profile=/nonexistent.json"], "no such file"),
    (["profile=x.json", "schedule=zigzag"], "schedule='zigzag' is invalid"),
])
def test_predict_errors_name_the_problem(args, msg, capsys):
    assert main(["predict", *args]) == 2
    assert msg in capsys.readouterr().err


def test_more_chunks_than_units_is_an_error():
    with pytest.raises(ValueError, match="64 chunks but the profile has only 26 partition units"):
        predict_scaling(_profile(), [32], "interleaved", 8, virtual=2)
