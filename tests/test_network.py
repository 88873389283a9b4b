"""NCCL network profiles."""

import subprocess
import sys

import pytest

from orchestrator.cluster import network
from orchestrator.cluster.network import (
    NETWORK_PROFILES,
    expected_bus_bandwidth_gbps,
    explain_network_env,
    network_env,
)
from orchestrator.errors import ConfigError


def test_profiles_listed():
    assert set(NETWORK_PROFILES) == {"nvlink_single_node", "infiniband", "efa", "tcp"}


def test_common_settings_in_every_profile():
    for profile in NETWORK_PROFILES:
        env = network_env(profile)
        assert env["NCCL_DEBUG"] == "WARN"
        assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        assert env["NCCL_SOCKET_IFNAME"].startswith("^") and "lo" in env["NCCL_SOCKET_IFNAME"]
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())


def test_infiniband():
    env = network_env("infiniband")
    assert env["NCCL_IB_DISABLE"] == "0"
    assert env["NCCL_IB_HCA"] == "mlx5"
    assert env["NCCL_NET_GDR_LEVEL"] == "PHB"
    assert int(env["NCCL_IB_TIMEOUT"]) >= 20
    assert "FI_PROVIDER" not in env


def test_efa():
    env = network_env("efa")
    assert env["FI_PROVIDER"] == "efa"
    assert env["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert env["NCCL_IB_DISABLE"] == "1"


def test_tcp_and_nvlink():
    tcp = network_env("tcp")
    assert tcp["NCCL_IB_DISABLE"] == "1" and "FI_PROVIDER" not in tcp and "NCCL_IB_HCA" not in tcp
    nv = network_env("nvlink_single_node")
    assert nv["NCCL_P2P_LEVEL"] == "NVL" and nv["NCCL_IB_DISABLE"] == "1"


def test_debug_flag_turns_on_info():
    env = network_env("infiniband", debug=True)
    assert env["NCCL_DEBUG"] == "INFO" and "NET" in env["NCCL_DEBUG_SUBSYS"]
    assert "NCCL_DEBUG_SUBSYS" not in network_env("infiniband")


def test_overrides_replace_add_and_delete():
    env = network_env("infiniband", {"NCCL_IB_HCA": "=mlx5_0,mlx5_1", "NCCL_DEBUG": None, "NCCL_CROSS_NIC": 1,
                                     "NCCL_IB_DISABLE": False})
    assert env["NCCL_IB_HCA"] == "=mlx5_0,mlx5_1"
    assert "NCCL_DEBUG" not in env
    assert env["NCCL_CROSS_NIC"] == "1" and env["NCCL_IB_DISABLE"] == "0"
    # the profile itself is not mutated
    assert network_env("infiniband")["NCCL_IB_HCA"] == "mlx5"


def test_every_setting_has_a_one_line_reason():
    for profile in NETWORK_PROFILES:
        settings = explain_network_env(profile)
        assert [s.name for s in settings] == list(network_env(profile))
        for s in settings:
            assert s.why and "\n" not in s.why and len(s.why) > 20


@pytest.mark.parametrize("bad", ["ethernet", "", "EFA"])
def test_unknown_profile_is_a_config_error(bad):
    with pytest.raises(ConfigError) as e:
        network_env(bad)
    assert e.value.key == "compute.network" and "efa" in str(e.value)
    with pytest.raises(ConfigError):
        expected_bus_bandwidth_gbps(bad)


def test_bad_override_key():
    with pytest.raises(ConfigError):
        network_env("tcp", {"": "x"})


def test_expected_bandwidth_order():
    bw = {p: expected_bus_bandwidth_gbps(p) for p in NETWORK_PROFILES}
    assert bw["nvlink_single_node"] > bw["infiniband"] > bw["efa"] > bw["tcp"] > 0
    # within an order of magnitude of the documented line rates
    assert 100 <= bw["nvlink_single_node"] <= 600
    assert 50 <= bw["infiniband"] <= 400      # 8 x 200 Gb/s HDR = 200 GB/s line rate
    assert 10 <= bw["efa"] <= 50              # p4d 400 Gb/s = 50 GB/s
    assert 0.5 <= bw["tcp"] <= 12.5           # 10-100 GbE
    assert set(network.BUS_BANDWIDTH_SOURCES) == set(NETWORK_PROFILES)


def test_no_torch_or_ray_import_at_module_level():
    code = ("import sys; import orchestrator.cluster.network, orchestrator.cluster.topology, "
            "orchestrator.plan.memory; bad = [m for m in ('torch', 'ray', 'deepspeed') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
