"""nvidia-smi topo -m and ibstat parsing on recorded outputs (tests/fixtures/cluster/)."""

from pathlib import Path

import pytest

from orchestrator.cluster.topology import link_rank, parse_ibstat, parse_nvidia_smi_topo

FIX = Path(__file__).parent / "fixtures" / "cluster"


def test_dgx_a100_topology():
    t = parse_nvidia_smi_topo((FIX / "nvidia_smi_topo_dgx_a100.txt").read_text())
    assert t.gpus == [f"GPU{i}" for i in range(8)]
    assert t.nics == [f"mlx5_{i}" for i in range(8)]
    assert len(t.pairs) == 28
    assert all(p.link == "NV12" and p.nvlinks == 12 for p in t.pairs)
    assert t.all_gpus_nvlink and t.min_nvlinks == 12
    # each NIC pair sits behind a PCIe switch with two GPUs
    aff = t.nic_affinity()
    assert aff["mlx5_0"] == ["GPU0", "GPU1"] and aff["mlx5_5"] == ["GPU4", "GPU5"]
    assert t.gpu_nic()["GPU3"] == ("mlx5_2", "PXB")
    assert t.gpudirect_rdma_ok()
    assert t.link("GPU0", "mlx5_7") == "SYS" and t.link("mlx5_0", "mlx5_1") == "PIX"
    assert t.cpu_affinity["GPU0"] == "48-63,176-191" and t.numa_affinity["GPU6"] == "5"
    d = t.to_dict()
    assert d["all_gpus_nvlink"] is True and len(d["pairs"]) == 28


def test_pcie_box_with_nic_legend():
    t = parse_nvidia_smi_topo((FIX / "nvidia_smi_topo_pcie_4gpu.txt").read_text())
    assert t.gpus == ["GPU0", "GPU1", "GPU2", "GPU3"]
    assert t.nics == ["mlx5_0"]  # NIC0 resolved through the "NIC Legend"
    links = {(p.a, p.b): p.link for p in t.pairs}
    assert links == {("GPU0", "GPU1"): "PHB", ("GPU0", "GPU2"): "SYS", ("GPU0", "GPU3"): "SYS",
                     ("GPU1", "GPU2"): "SYS", ("GPU1", "GPU3"): "SYS", ("GPU2", "GPU3"): "PHB"}
    assert not t.all_gpus_nvlink and t.min_nvlinks == 0
    assert t.nic_affinity() == {"mlx5_0": ["GPU0", "GPU1"]}
    assert t.gpu_nic()["GPU2"] == ("mlx5_0", "SYS")
    assert not t.gpudirect_rdma_ok()
    assert t.numa_affinity == {"GPU0": "0", "GPU1": "0", "GPU2": "1", "GPU3": "1"}


def test_partial_nvlink_is_not_all_nvlink():
    text = ("\tGPU0\tGPU1\tGPU2\tCPU Affinity\tNUMA Affinity\n"
            "GPU0\t X \tNV4\tSYS\t0-7\t0\n"
            "GPU1\tNV4\t X \tSYS\t0-7\t0\n"
            "GPU2\tSYS\tSYS\t X \t8-15\t1\n")
    t = parse_nvidia_smi_topo(text)
    assert [p.nvlinks for p in t.pairs] == [4, 0, 0]
    assert not t.all_gpus_nvlink and t.nics == []
    assert t.gpu_nic() == {"GPU0": None, "GPU1": None, "GPU2": None}


def test_link_rank_order():
    order = ["NV12", "PIX", "PXB", "PHB", "NODE", "SYS"]
    assert [link_rank(x) for x in order] == sorted(link_rank(x) for x in order)
    assert link_rank("NV2") == link_rank("NV18") < link_rank("PIX")


@pytest.mark.parametrize("text", ["", "No devices were found\n", "\tGPU0\tGPU1\nGPU0\t X \n"])
def test_bad_topo_output_raises(text):
    with pytest.raises(ValueError):
        parse_nvidia_smi_topo(text)


def test_ibstat_two_active_one_down():
    cas = parse_ibstat((FIX / "ibstat_2active_1down.txt").read_text())
    assert [c.name for c in cas] == ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"]
    ports = {c.name: c.ports[0] for c in cas}
    assert all(len(c.ports) == 1 and c.ports[0].number == 1 for c in cas)
    ib_active = [n for n, p in ports.items() if p.active and p.link_layer == "InfiniBand"]
    assert ib_active == ["mlx5_0", "mlx5_1"]
    assert ports["mlx5_0"].rate_gbps == 200 and ports["mlx5_1"].rate_gbps == 200
    down = ports["mlx5_2"]
    assert down.state == "Down" and down.physical_state == "Polling" and not down.active
    assert ports["mlx5_3"].link_layer == "Ethernet" and ports["mlx5_3"].active and ports["mlx5_3"].rate_gbps == 100
    assert cas[0].ca_type == "MT4123" and cas[0].firmware == "20.31.1014"
    assert [p["active"] for c in cas for p in c.to_dict()["ports"]] == [True, True, False, True]


def test_ibstat_multi_port_ca():
    text = """CA 'mlx5_bond_0'
\tCA type: MT4129
\tNumber of ports: 2
\tPort 1:
\t\tState: Active
\t\tPhysical state: LinkUp
\t\tRate: 400
\t\tLink layer: InfiniBand
\tPort 2:
\t\tState: Initializing
\t\tPhysical state: LinkUp
\t\tRate: 400
\t\tLink layer: InfiniBand
"""
    (ca,) = parse_ibstat(text)
    assert [p.number for p in ca.ports] == [1, 2]
    assert [p.active for p in ca.ports] == [True, False]  # Initializing: SM has not brought it up
    assert [p.number for p in ca.active_ports] == [1]


def test_ibstat_garbage_raises():
    with pytest.raises(ValueError):
        parse_ibstat("ibstat: command not found\n")
