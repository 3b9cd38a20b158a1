"""The multi-node flags' checks, the node layout of TP ranks, and the Ray cluster file's parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tpla_serve.cluster.config import ClusterConfig
from tpla_serve.cluster.placement import address_from_ports, router_argv, server_argv
from tpla_serve.config import EngineConfig

ROOT = Path(__file__).resolve().parents[2]


def test_nodes_split_the_tp_ranks_evenly():
    config = EngineConfig(tp_size=4, nnodes=2, node_rank=1, dist_init_addr="10.0.0.1:5000", device="cpu")
    assert config.ranks_per_node == 2 and list(config.node_ranks) == [2, 3]
    assert config.dist_init_host_port == ("10.0.0.1", 5000)
    ipv6 = EngineConfig(tp_size=2, nnodes=2, dist_init_addr="[fd00::1]:5000")
    assert ipv6.dist_init_host_port == ("fd00::1", 5000)


@pytest.mark.parametrize(("kwargs", "said"), [
    ({"nnodes": 0}, "--nnodes must be >= 1"),
    ({"tp_size": 2, "nnodes": 2, "node_rank": 2, "dist_init_addr": "h:1"}, "--node-rank must be in"),
    ({"tp_size": 2, "nnodes": 2, "dist_init_addr": "h:0"}, "port in 1..65535"),
    ({"tp_size": 2, "nnodes": 2, "dist_init_addr": ":5000"}, "HOST:PORT"),
])
def test_bad_multi_node_settings_name_the_flag(kwargs, said):
    with pytest.raises(ValueError, match=said):
        EngineConfig(**kwargs)


def test_the_shipped_cluster_file_places_a_spread_decode_server():
    config = ClusterConfig.load(str(ROOT / "launch" / "cluster.yaml"))
    decode = config.decode
    assert (decode.tp_size, decode.tpla_groups, decode.nnodes, decode.bundle) == (2, 2, 2, {"CPU": 1})
    where = address_from_ports(decode, ["10.0.0.2", "10.0.0.3"], [30001, 5000])
    node1 = server_argv(config, decode, where, 1)
    assert node1[:4] == ["--role", "decode", "--host", "10.0.0.3"]
    assert node1[node1.index("--node-rank") + 1] == "1"
    assert node1[node1.index("--dist-init-addr") + 1] == "10.0.0.2:5000"
    prefill = address_from_ports(config.prefill, ["10.0.0.1"], [30002, 8998])
    assert router_argv(config, "10.0.0.4", [prefill], [where])[4:] == [
        "--port", "30000", "--prefill", "http://10.0.0.1:30002", "8998", "--decode", "http://10.0.0.2:30001"]


@pytest.mark.parametrize(("data", "said"), [
    ({"prefill": {}}, "needs a decode: section"),
    ({"prefill": {}, "decode": {"tp_size": 3, "nnodes": 2}}, "multiple of nnodes"),
    ({"prefill": {"tpla_groups": 2, "tp_size": 2}, "decode": {}}, "exact MLA"),
    ({"prefill": {"replica": 2}, "decode": {}}, "unknown keys replica"),
    ({"prefill": {}, "decode": {"args": ["--tp-size", "4"]}}, "--tp-size is set by the cluster"),
    ({"prefill": {}, "decode": {"args": "--x"}}, "list of strings"),
])
def test_a_bad_cluster_file_is_refused_naming_the_key(data, said):
    with pytest.raises(ValueError, match=said):
        ClusterConfig.from_dict(data)
