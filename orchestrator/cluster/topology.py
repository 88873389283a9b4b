"""Parsers for ``nvidia-smi topo -m`` and ``ibstat`` output (pure Python).

``nvidia-smi topo -m`` prints a device x device matrix.  Cells:
    X     self
    NV#   bonded set of # NVLinks            (best)
    PIX   at most one PCIe bridge
    PXB   several PCIe bridges, no host bridge
    PHB   through a PCIe host bridge (the CPU)
    NODE  across host bridges within a NUMA node
    SYS   across the SMP interconnect between NUMA nodes (QPI/UPI/xGMI)   (worst)
Rows/columns are GPUs (``GPU0``...) and NICs: older drivers name NICs directly (``mlx5_0``), newer ones
print ``NIC0``... plus a "NIC Legend" (``NIC0: mlx5_0``) that we use to resolve the names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "LINK_RANK",
    "GpuPair",
    "GpuTopology",
    "IbPort",
    "IbCA",
    "parse_nvidia_smi_topo",
    "parse_ibstat",
    "link_rank",
]

# Lower is closer/faster.  NV# are all rank 0 (more links = more bandwidth, compared via nvlinks).
LINK_RANK: dict[str, int] = {"X": -1, "NV": 0, "PIX": 1, "PXB": 2, "PHB": 3, "NODE": 4, "SYS": 5}

_NV_RE = re.compile(r"^NV(\d+)$")
_GPU_RE = re.compile(r"^GPU\d+$")
_LEGEND_RE = re.compile(r"^\s*(NIC\d+)\s*:\s*(\S+)\s*$")


def link_rank(link: str) -> int:
    """Rank of a topo cell (smaller = closer); unknown cells rank after SYS."""
    if _NV_RE.match(link):
        return LINK_RANK["NV"]
    return LINK_RANK.get(link, 99)


@dataclass(frozen=True)
class GpuPair:
    a: str
    b: str
    link: str

    @property
    def nvlinks(self) -> int:
        """Number of bonded NVLinks between the two GPUs (0 if the path is PCIe/SMP)."""
        m = _NV_RE.match(self.link)
        return int(m.group(1)) if m else 0

    @property
    def is_nvlink(self) -> bool:
        return self.nvlinks > 0


@dataclass
class GpuTopology:
    gpus: list[str]
    nics: list[str]
    links: dict[tuple[str, str], str]
    cpu_affinity: dict[str, str] = field(default_factory=dict)
    numa_affinity: dict[str, str] = field(default_factory=dict)

    def link(self, a: str, b: str) -> str:
        return self.links[(a, b)]

    @property
    def pairs(self) -> list[GpuPair]:
        """Every unordered GPU pair (i < j) with its link."""
        return [GpuPair(a, b, self.links[(a, b)])
                for i, a in enumerate(self.gpus) for b in self.gpus[i + 1:]]

    @property
    def all_gpus_nvlink(self) -> bool:
        """True if every GPU pair is directly NVLink-connected (NVSwitch boxes); False with < 2 GPUs."""
        pairs = self.pairs
        return bool(pairs) and all(p.is_nvlink for p in pairs)

    @property
    def min_nvlinks(self) -> int:
        return min((p.nvlinks for p in self.pairs), default=0)

    def nic_affinity(self) -> dict[str, list[str]]:
        """For each NIC, the GPUs it is closest to (all GPUs at the best link rank seen from that NIC)."""
        out: dict[str, list[str]] = {}
        for nic in self.nics:
            ranks = {g: link_rank(self.links[(nic, g)]) for g in self.gpus}
            best = min(ranks.values(), default=99)
            out[nic] = [g for g in self.gpus if ranks[g] == best]
        return out

    def gpu_nic(self) -> dict[str, tuple[str, str] | None]:
        """For each GPU, its nearest NIC and the link to it (first NIC wins ties), or None without NICs."""
        out: dict[str, tuple[str, str] | None] = {}
        for g in self.gpus:
            best = None
            for nic in self.nics:
                link = self.links[(g, nic)]
                if best is None or link_rank(link) < link_rank(best[1]):
                    best = (nic, link)
            out[g] = best
        return out

    def gpudirect_rdma_ok(self) -> bool:
        """True if every GPU has a NIC at most a PCIe switch away (PIX/PXB): GPUDirect RDMA at full speed."""
        nearest = self.gpu_nic()
        return bool(nearest) and all(v is not None and link_rank(v[1]) <= LINK_RANK["PXB"]
                                     for v in nearest.values())

    def to_dict(self) -> dict:
        return {
            "gpus": list(self.gpus),
            "nics": list(self.nics),
            "all_gpus_nvlink": self.all_gpus_nvlink,
            "min_nvlinks": self.min_nvlinks,
            "pairs": [{"a": p.a, "b": p.b, "link": p.link} for p in self.pairs],
            "nic_affinity": self.nic_affinity(),
            "gpu_nic": {g: (list(v) if v else None) for g, v in self.gpu_nic().items()},
            "gpudirect_rdma_ok": self.gpudirect_rdma_ok(),
            "cpu_affinity": dict(self.cpu_affinity),
            "numa_affinity": dict(self.numa_affinity),
        }


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def parse_nvidia_smi_topo(text: str) -> GpuTopology:
    """Parse ``nvidia-smi topo -m`` output.  Raises ValueError if no device matrix is found."""
    lines = _strip_ansi(text).splitlines()
    legend = {}
    for line in lines:
        m = _LEGEND_RE.match(line)
        if m:
            legend[m.group(1)] = m.group(2)

    header: list[str] | None = None
    header_idx = -1
    for i, line in enumerate(lines):
        toks = line.split()
        # the header: first token is a GPU name and the next is a device name or "CPU", not a cell ("X", "NV12")
        if len(toks) >= 1 and _GPU_RE.match(toks[0]) and (len(toks) == 1 or link_rank(toks[1]) == 99):
            header, header_idx = [], i
            for t in toks:
                if t in ("CPU", "NUMA", "GPU") or t.startswith("Affinity"):
                    break
                header.append(t)
            break
    if not header:
        raise ValueError("nvidia-smi topo -m: no header line with GPU columns found")

    devices = header
    n = len(devices)
    links: dict[tuple[str, str], str] = {}
    cpu_aff: dict[str, str] = {}
    numa_aff: dict[str, str] = {}
    seen_rows: list[str] = []
    for line in lines[header_idx + 1:]:
        toks = line.split()
        if not toks:
            continue
        if toks[0] not in devices:
            if seen_rows and toks[0].rstrip(":") == "Legend":
                break
            continue
        row = toks[0]
        cells = toks[1:1 + n]
        if len(cells) < n:
            raise ValueError(f"nvidia-smi topo -m: row {row!r} has {len(cells)} cells, expected {n}")
        for col, cell in zip(devices, cells):
            links[(row, col)] = cell
        extra = toks[1 + n:]
        if _GPU_RE.match(row):
            if len(extra) >= 1:
                cpu_aff[row] = extra[0]
            if len(extra) >= 2:
                numa_aff[row] = extra[1]
        seen_rows.append(row)

    missing = [d for d in devices if d not in seen_rows]
    if missing:
        raise ValueError(f"nvidia-smi topo -m: rows missing for {missing}")

    rename = {d: legend.get(d, d) for d in devices}
    gpus = [rename[d] for d in devices if _GPU_RE.match(d)]
    nics = [rename[d] for d in devices if not _GPU_RE.match(d)]
    links = {(rename[a], rename[b]): v for (a, b), v in links.items()}
    return GpuTopology(gpus=gpus, nics=nics, links=links,
                       cpu_affinity={rename[k]: v for k, v in cpu_aff.items()},
                       numa_affinity={rename[k]: v for k, v in numa_aff.items()})


# --------------------------------------------------------------------------- ibstat


@dataclass(frozen=True)
class IbPort:
    number: int
    state: str = ""
    physical_state: str = ""
    rate_gbps: float | None = None
    link_layer: str = ""
    base_lid: int | None = None

    @property
    def active(self) -> bool:
        """Usable: logical state Active and physical state LinkUp."""
        return self.state == "Active" and self.physical_state == "LinkUp"


@dataclass(frozen=True)
class IbCA:
    name: str
    ca_type: str = ""
    firmware: str = ""
    ports: tuple[IbPort, ...] = ()

    @property
    def active_ports(self) -> list[IbPort]:
        return [p for p in self.ports if p.active]

    def to_dict(self) -> dict:
        return {
            "name": self.name, "ca_type": self.ca_type, "firmware": self.firmware,
            "ports": [{"number": p.number, "state": p.state, "physical_state": p.physical_state,
                       "rate_gbps": p.rate_gbps, "link_layer": p.link_layer, "active": p.active}
                      for p in self.ports],
        }


_CA_RE = re.compile(r"^CA\s+'([^']+)'")
_PORT_RE = re.compile(r"^\s*Port\s+(\d+)\s*:\s*$")
_KV_RE = re.compile(r"^\s*([A-Za-z][A-Za-z ]*?)\s*:\s*(.*?)\s*$")


def parse_ibstat(text: str) -> list[IbCA]:
    """Parse ``ibstat`` output into CAs with their ports.  Raises ValueError if no ``CA '...'`` block is found."""
    cas: list[IbCA] = []
    cur: dict | None = None
    port: dict | None = None

    def close_port():
        nonlocal port
        if cur is not None and port is not None:
            cur["ports"].append(IbPort(**port))
        port = None

    def close_ca():
        nonlocal cur
        close_port()
        if cur is not None:
            cas.append(IbCA(name=cur["name"], ca_type=cur["ca_type"], firmware=cur["firmware"],
                            ports=tuple(cur["ports"])))
        cur = None

    for line in _strip_ansi(text).splitlines():
        m = _CA_RE.match(line)
        if m:
            close_ca()
            cur = {"name": m.group(1), "ca_type": "", "firmware": "", "ports": []}
            continue
        if cur is None:
            continue
        m = _PORT_RE.match(line)
        if m:
            close_port()
            port = {"number": int(m.group(1))}
            continue
        m = _KV_RE.match(line)
        if not m:
            continue
        key, value = m.group(1).strip().lower(), m.group(2)
        if port is None:
            if key == "ca type":
                cur["ca_type"] = value
            elif key == "firmware version":
                cur["firmware"] = value
            continue
        if key == "state":
            port["state"] = value
        elif key == "physical state":
            port["physical_state"] = value
        elif key == "rate":
            try:
                port["rate_gbps"] = float(value)
            except ValueError:
                port["rate_gbps"] = None
        elif key == "link layer":
            port["link_layer"] = value
        elif key == "base lid":
            try:
                port["base_lid"] = int(value, 0)
            except ValueError:
                pass
    close_ca()
    if not cas:
        raise ValueError("ibstat: no \"CA '<name>'\" block found")
    return cas
