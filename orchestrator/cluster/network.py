"""NCCL network profiles: the environment each interconnect needs, and the bus bandwidth a healthy one reaches.

Pure Python (no torch/ray import): the plan computes these and the launcher puts them in the Ray
worker ``runtime_env`` so they are set before Ray Train's ``init_process_group`` runs in each worker.

Profiles:
    nvlink_single_node  one node, GPUs talk over NVLink/NVSwitch; no inter-node network at all.
    infiniband          nodes linked by InfiniBand (Mellanox/NVIDIA ConnectX HCAs, ``mlx5_*``), GPUDirect RDMA.
    efa                 AWS Elastic Fabric Adapter (p4d/p5) through libfabric + the aws-ofi-nccl plugin.
    tcp                 plain Ethernet sockets (no RDMA); also what the CPU/gloo test setups use.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.errors import ConfigError

__all__ = [
    "Setting",
    "NETWORK_PROFILES",
    "network_env",
    "explain_network_env",
    "expected_bus_bandwidth_gbps",
    "BUS_BANDWIDTH_SOURCES",
]


@dataclass(frozen=True)
class Setting:
    """One environment variable of a profile, with a one-line reason."""

    name: str
    value: str
    why: str


# Interfaces NCCL must never use for its bootstrap/socket traffic: container bridges and loopback
# ("^" = exclude-list, prefix match; NCCL docs, "NCCL_SOCKET_IFNAME").
_EXCLUDE_VIRTUAL_IFS = "^docker,lo,veth,virbr"

_COMMON: tuple[Setting, ...] = (
    Setting("NCCL_DEBUG", "WARN",
            "Print NCCL warnings (transport fallbacks, timeouts) without the per-rank INFO flood; "
            "INFO when debug=True."),
    Setting("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1",
            "On a failed/timed-out collective, abort the communicator and crash the worker so Ray Train's "
            "FailureConfig restarts the group instead of hanging forever."),
    Setting("NCCL_SOCKET_IFNAME", _EXCLUDE_VIRTUAL_IFS,
            "Keep NCCL bootstrap (and any socket transport) off docker/loopback/veth bridges, which do not "
            "route between nodes."),
)

_PROFILES: dict[str, tuple[Setting, ...]] = {
    "nvlink_single_node": (
        Setting("NCCL_P2P_LEVEL", "NVL",
                "Use direct GPU peer-to-peer only over NVLink; PCIe P2P through the CPU is often slower than "
                "staging through host memory."),
        Setting("NCCL_IB_DISABLE", "1",
                "Single node: no inter-node traffic, so skip probing HCAs (and avoid loopback over the NIC)."),
        Setting("NCCL_SHM_DISABLE", "0",
                "Keep the shared-memory transport for any pair without NVLink; needs the enlarged /dev/shm "
                "the cluster definitions mount."),
    ),
    "infiniband": (
        Setting("NCCL_IB_DISABLE", "0",
                "Use NCCL's native InfiniBand verbs transport between nodes (the default, stated explicitly "
                "so a stray global setting cannot turn it off)."),
        Setting("NCCL_IB_HCA", "mlx5",
                "Use the ConnectX HCAs (prefix match on mlx5_*); override with '=mlx5_0,mlx5_1:1' to pin "
                "exact rails or to drop storage/management HCAs."),
        Setting("NCCL_NET_GDR_LEVEL", "PHB",
                "Allow GPUDirect RDMA (NIC reads/writes GPU memory) when GPU and NIC share a PCIe host bridge, "
                "which covers PIX/PXB/PHB placements in DGX/HGX boxes."),
        Setting("NCCL_P2P_LEVEL", "NVL",
                "Intra-node traffic over NVLink only; PCIe P2P via the CPU is slower than host staging."),
        Setting("NCCL_IB_TIMEOUT", "22",
                "IB verbs ack timeout exponent (4.096us * 2^22 ~= 17 s): tolerate congested large fabrics "
                "instead of failing with IBV_WC_RETRY_EXC_ERR."),
        Setting("NCCL_IB_RETRY_CNT", "7",
                "Maximum verbs retry count before a send is declared failed (7 is the IB spec maximum)."),
    ),
    "efa": (
        Setting("FI_PROVIDER", "efa",
                "Force libfabric onto the EFA provider; otherwise it may silently pick tcp/sockets and run "
                "at a fraction of the bandwidth."),
        Setting("FI_EFA_USE_DEVICE_RDMA", "1",
                "Use EFA RDMA read (GPUDirect) on p4d/p5, so GPU buffers go to the NIC without a host copy."),
        Setting("FI_EFA_FORK_SAFE", "1",
                "Ray and Python spawn subprocesses; make libfabric's registered memory safe across fork()."),
        Setting("NCCL_IB_DISABLE", "1",
                "EFA shows up as a verbs device but NCCL's built-in IB transport cannot drive it; traffic "
                "must go through the aws-ofi-nccl net plugin."),
        Setting("NCCL_P2P_LEVEL", "NVL",
                "Intra-node traffic over NVLink/NVSwitch only."),
        Setting("NCCL_NET_GDR_LEVEL", "SYS",
                "p4d/p5 support GPUDirect RDMA to every NIC; let NCCL use it regardless of PCIe distance."),
    ),
    "tcp": (
        Setting("NCCL_IB_DISABLE", "1",
                "No RDMA fabric: do not probe HCAs; use the socket transport."),
        Setting("NCCL_SOCKET_NTHREADS", "4",
                "More helper threads per socket connection to saturate 25-100 GbE links (threads x socks <= 64)."),
        Setting("NCCL_NSOCKS_PERTHREAD", "4",
                "Several TCP streams per thread: a single stream rarely fills a fast Ethernet link."),
        Setting("NCCL_P2P_LEVEL", "NVL",
                "Intra-node traffic still prefers NVLink when present."),
    ),
}

NETWORK_PROFILES: tuple[str, ...] = tuple(_PROFILES)

# nccl-tests all_reduce_perf "busbw" at large messages (>=256 MB), in GB/s (gigabytes/s, the unit nccl-tests
# prints), for a healthy link of each kind.  Order-of-magnitude floors, not guarantees.
_EXPECTED_BUSBW_GBPS: dict[str, float] = {
    "nvlink_single_node": 230.0,
    "infiniband": 180.0,
    "efa": 40.0,
    "tcp": 1.0,
}

BUS_BANDWIDTH_SOURCES: dict[str, str] = {
    "nvlink_single_node": (
        "8x A100 SXM on NVSwitch (DGX A100 / HGX A100): nccl-tests all_reduce busbw ~230 GB/s "
        "(NVLink3 600 GB/s bidirectional per GPU); 8x H100 SXM (NVLink4) reaches ~450 GB/s."),
    "infiniband": (
        "DGX A100 / HGX with 8x HDR 200 Gb/s (25 GB/s) rails per node: multi-node all_reduce busbw ~180-190 GB/s, "
        "about 90% of 8 x 25 GB/s (NVIDIA DGX SuperPOD reference architecture, nccl-tests). NDR 400 Gb/s doubles it."),
    "efa": (
        "p4d.24xlarge, 4x 100 Gb/s EFA = 400 Gb/s = 50 GB/s per node: aws-ofi-nccl nccl-tests all_reduce "
        "busbw ~40 GB/s across nodes; p5.48xlarge (3200 Gb/s EFAv2) reaches roughly 8x that."),
    "tcp": (
        "10 GbE = 1.25 GB/s line rate; NCCL socket transport gets ~1 GB/s busbw (25/100 GbE scale it, "
        "but single-stream TCP rarely exceeds ~3-10 GB/s)."),
}


def _check_profile(profile: str) -> None:
    if profile not in _PROFILES:
        raise ConfigError(
            "compute.network",
            f"unknown network profile {profile!r}; choose one of {', '.join(NETWORK_PROFILES)}",
        )


def explain_network_env(profile: str, *, debug: bool = False) -> list[Setting]:
    """The settings of a profile (common ones first), each with its reason."""
    _check_profile(profile)
    settings = list(_COMMON) + list(_PROFILES[profile])
    if debug:
        settings = [
            Setting(s.name, "INFO", "Debug run: log transport selection (NET/IB, NET/OFI or NET/Socket) per rank.")
            if s.name == "NCCL_DEBUG" else s
            for s in settings
        ]
        settings.append(Setting("NCCL_DEBUG_SUBSYS", "INIT,NET,ENV",
                                "Debug run: limit INFO output to init, transport and env decisions."))
    return settings


def network_env(profile: str, overrides: dict | None = None, *, debug: bool = False) -> dict[str, str]:
    """NCCL/libfabric environment for ``profile``; ``overrides`` replaces or adds variables (value None deletes).

    Raises ConfigError('compute.network', ...) for an unknown profile or a non-string override key.
    """
    env = {s.name: s.value for s in explain_network_env(profile, debug=debug)}
    for key, value in (overrides or {}).items():
        if not isinstance(key, str) or not key:
            raise ConfigError("compute.network", f"override key {key!r} is not an environment variable name")
        if value is None:
            env.pop(key, None)
        elif isinstance(value, bool):
            env[key] = "1" if value else "0"
        else:
            env[key] = str(value)
    return env


def expected_bus_bandwidth_gbps(profile: str) -> float:
    """all-reduce bus bandwidth (GB/s, as nccl-tests reports busbw) a healthy ``profile`` link reaches.

    Order of magnitude at large message sizes; see BUS_BANDWIDTH_SOURCES[profile] for where it comes from.
    """
    _check_profile(profile)
    return _EXPECTED_BUSBW_GBPS[profile]
