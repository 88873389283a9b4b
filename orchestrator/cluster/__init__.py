"""Cluster layer: NCCL network profiles, GPU/NIC topology parsing (pure Python, no torch/ray imports)."""

from orchestrator.cluster.network import (
    NETWORK_PROFILES,
    expected_bus_bandwidth_gbps,
    explain_network_env,
    network_env,
)
from orchestrator.cluster.topology import GpuTopology, IbCA, IbPort, parse_ibstat, parse_nvidia_smi_topo

__all__ = [
    "NETWORK_PROFILES",
    "network_env",
    "explain_network_env",
    "expected_bus_bandwidth_gbps",
    "GpuTopology",
    "IbCA",
    "IbPort",
    "parse_nvidia_smi_topo",
    "parse_ibstat",
]
