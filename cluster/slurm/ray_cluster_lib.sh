#!/usr/bin/env bash
# Ray-on-SLURM start-up logic, sourced by ray_job.sbatch (and by tests with fake SLURM variables).
#
# One Ray node per SLURM node: the first node of the allocation runs the Ray head, the others run Ray
# workers; each is a `srun` step running `ray start --block`, so killing the step stops that node's Ray.
#
# Inputs (environment):
#   SLURM_JOB_NODELIST   nodes of the allocation (expanded with `scontrol show hostnames`)
#   SLURM_GPUS_ON_NODE   GPUs per node given to Ray (default 0)
#   SLURM_CPUS_ON_NODE   CPUs per node given to Ray (default: nproc)
#   SLURM_JOB_ID         used for the default temp dir
#   RAY_PORT (6379) RAY_DASHBOARD_PORT (8265) RAY_CLIENT_SERVER_PORT (10001)
#   RAY_DASHBOARD_AGENT_LISTEN_PORT (52365) RAY_INCLUDE_DASHBOARD (true)
#   RAY_TEMP_DIR (/tmp/ray-$SLURM_JOB_ID)   node-local; keep it short (unix socket paths <= 107 bytes)
#   RAY_START_TIMEOUT_S (300)               how long to wait for all nodes to join
#   RAY_HEAD_IP                             skip the IP lookup of the head node
#   RAY_NODE_IFACE                          take the head's address from this interface (e.g. ib0, eth0)
#   DRY_RUN=1                               print the commands instead of running them
#   PYTHON (python)  RAY (ray)  SRUN (srun)  SCONTROL (scontrol)   the executables used
#
# Functions: ray_nodes, ray_head_node, ray_worker_nodes, ray_num_nodes, ray_node_ip, ray_head_address,
#   ray_head_cmd, ray_worker_cmd, ray_start_cluster, ray_wait_for_nodes, ray_alive_nodes, ray_stop_cluster.

: "${RAY_PORT:=6379}"
: "${RAY_DASHBOARD_PORT:=8265}"
: "${RAY_CLIENT_SERVER_PORT:=10001}"
: "${RAY_DASHBOARD_AGENT_LISTEN_PORT:=52365}"
: "${RAY_INCLUDE_DASHBOARD:=true}"
: "${RAY_TEMP_DIR:=/tmp/ray-${SLURM_JOB_ID:-$$}}"
: "${RAY_START_TIMEOUT_S:=300}"
: "${DRY_RUN:=0}"
: "${PYTHON:=python}"
: "${RAY:=ray}"
: "${SRUN:=srun}"
: "${SCONTROL:=scontrol}"
# Ray >= 2.59 turns on token authentication; clients (ray.init, ray job submit, joining workers) must use it
# too. The token lives in ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH): put it on the shared home/filesystem.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

RAY_STEP_PIDS=()

_ray_log() { printf '[ray-slurm] %s\n' "$*" >&2; }

# Print a command shell-quoted on one line.
_ray_quote() {
    local out="" a
    for a in "$@"; do out+="$(printf '%q' "$a") "; done
    printf '%s\n' "${out% }"
}

# Run a command, or print it with a "+ " prefix when DRY_RUN=1.
ray_run() {
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '+ %s\n' "$(_ray_quote "$@")"
    else
        "$@"
    fi
}

# Run a command in the background (a srun step); remember its PID for ray_stop_cluster.
ray_run_bg() {
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '+ %s &\n' "$(_ray_quote "$@")"
    else
        "$@" &
        RAY_STEP_PIDS+=("$!")
    fi
}

ray_nodes() {
    if [[ -z "${SLURM_JOB_NODELIST:-}" ]]; then
        _ray_log "SLURM_JOB_NODELIST is not set: not inside a SLURM allocation?"
        return 1
    fi
    "$SCONTROL" show hostnames "$SLURM_JOB_NODELIST"
}

# (the node list is captured first so a failing ray_nodes fails these too, with or without pipefail)
ray_num_nodes() {
    local nodes
    nodes="$(ray_nodes)" || return 1
    grep -c . <<<"$nodes"
}

ray_head_node() {
    local nodes
    nodes="$(ray_nodes)" || return 1
    head -n 1 <<<"$nodes"
}

ray_worker_nodes() {
    local nodes
    nodes="$(ray_nodes)" || return 1
    tail -n +2 <<<"$nodes"
}

# First IPv4 address of a node, looked up on that node (a compute node's hostname may not resolve on others).
ray_node_ip() {
    local node="$1" addrs a ip="" lo=""
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '%s\n' "$node"
        return 0
    fi
    # `hostname -I` lists the node's addresses (`hostname --ip-address` often gives 127.0.1.1 on Debian/Ubuntu).
    # With RAY_NODE_IFACE set (e.g. ib0, eth0) take that interface's address instead.
    if [[ -n "${RAY_NODE_IFACE:-}" ]]; then
        addrs="$("$SRUN" --nodes=1 --ntasks=1 -w "$node" ip -4 -o addr show dev "$RAY_NODE_IFACE" \
            | awk '{print $4}' | cut -d/ -f1)"
    else
        addrs="$("$SRUN" --nodes=1 --ntasks=1 -w "$node" bash -c 'hostname -I 2>/dev/null || hostname --ip-address')"
    fi
    # Prefer the first non-loopback IPv4; loopback only if nothing else (single-node tests).
    for a in $addrs; do
        [[ "$a" =~ ^[0-9]+(\.[0-9]+){3}$ ]] || continue
        if [[ "$a" == 127.* ]]; then
            lo="${lo:-$a}"
        else
            ip="$a"
            break
        fi
    done
    ip="${ip:-$lo}"
    if [[ -z "$ip" ]]; then
        _ray_log "could not find an IPv4 address of $node"
        return 1
    fi
    printf '%s\n' "$ip"
}

ray_head_address() {
    local ip="${RAY_HEAD_IP:-}"
    if [[ -z "$ip" ]]; then
        ip="$(ray_node_ip "$(ray_head_node)")" || return 1
    fi
    printf '%s:%s\n' "$ip" "$RAY_PORT"
}

_ray_resources() {
    printf '%s\n' "--num-cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}" "--num-gpus=${SLURM_GPUS_ON_NODE:-0}"
}

# The `ray start` command of the head node (arguments: head IP).  Printed one argument per line.
ray_head_cmd() {
    local ip="$1"
    printf '%s\n' "$RAY" start --head --block \
        "--node-ip-address=$ip" "--port=$RAY_PORT" \
        "--include-dashboard=$RAY_INCLUDE_DASHBOARD" --dashboard-host=0.0.0.0 "--dashboard-port=$RAY_DASHBOARD_PORT" \
        "--ray-client-server-port=$RAY_CLIENT_SERVER_PORT" \
        "--dashboard-agent-listen-port=$RAY_DASHBOARD_AGENT_LISTEN_PORT" \
        "--temp-dir=$RAY_TEMP_DIR"
    _ray_resources
}

# The `ray start` command of a worker node (arguments: head address ip:port).  Printed one argument per line.
ray_worker_cmd() {
    local address="$1"
    printf '%s\n' "$RAY" start --block "--address=$address" \
        "--dashboard-agent-listen-port=$RAY_DASHBOARD_AGENT_LISTEN_PORT" \
        "--temp-dir=$RAY_TEMP_DIR"
    _ray_resources
}

# Number of alive Ray nodes at an address (prints 0 if it cannot connect).
ray_alive_nodes() {
    local address="$1"
    "$PYTHON" - "$address" <<'PY' 2>/dev/null || echo 0
import sys
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
PY
}

# Wait until `expected` nodes are alive at `address`, or fail after RAY_START_TIMEOUT_S.
ray_wait_for_nodes() {
    local address="$1" expected="$2" waited=0 alive=0
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '+ wait for %s Ray nodes at %s\n' "$expected" "$address"
        return 0
    fi
    while (( waited < RAY_START_TIMEOUT_S )); do
        alive="$(ray_alive_nodes "$address" | tail -n 1)"
        if [[ "$alive" =~ ^[0-9]+$ ]] && (( alive >= expected )); then
            _ray_log "$alive/$expected Ray nodes alive at $address after ${waited}s"
            return 0
        fi
        sleep 5
        waited=$(( waited + 5 ))
    done
    _ray_log "timed out after ${RAY_START_TIMEOUT_S}s: ${alive:-0}/$expected Ray nodes alive at $address"
    return 1
}

# Start the head on the first node and one worker per other node; wait for all of them; export RAY_ADDRESS.
# Token auth needs a token on every node: when none is given (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH's file or
# ~/.ray/auth_token), write a new one (mode 0600) where RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token says; on a
# shared home every node of the job reads the same file.
ray_ensure_token() {
    [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" ]] || return 0
    local path="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    [[ -s "$path" ]] && return 0
    ray_run mkdir -p "$(dirname "$path")"
    if [[ "$DRY_RUN" != 1 ]]; then
        (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$path")
    fi
    _ray_log "wrote a new Ray auth token to $path"
}

ray_start_cluster() {
    local head n ip address
    local -a head_cmd worker_cmd
    ray_ensure_token
    head="$(ray_head_node)" || return 1
    n="$(ray_num_nodes)"
    address="$(ray_head_address)" || return 1
    ip="${address%:*}"
    mapfile -t head_cmd < <(ray_head_cmd "$ip")
    mapfile -t worker_cmd < <(ray_worker_cmd "$address")

    _ray_log "head $head ($address), $n node(s), ${SLURM_GPUS_ON_NODE:-0} GPU(s) per node"
    ray_run_bg "$SRUN" --nodes=1 --ntasks=1 -w "$head" "${head_cmd[@]}"
    if [[ "$DRY_RUN" != 1 ]]; then
        sleep 5  # let the GCS come up before workers try to join
    fi
    if (( n > 1 )); then
        ray_run_bg "$SRUN" "--nodes=$(( n - 1 ))" "--ntasks=$(( n - 1 ))" --ntasks-per-node=1 \
            "--exclude=$head" "${worker_cmd[@]}"
    fi
    ray_wait_for_nodes "$address" "$n" || return 1
    export RAY_ADDRESS="$address"
}

# Stop the Ray steps this script started (SIGTERM to `ray start --block` makes it stop its node's Ray).
ray_stop_cluster() {
    local pid
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '+ stop Ray steps\n'
        return 0
    fi
    for pid in "${RAY_STEP_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${RAY_STEP_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    RAY_STEP_PIDS=()
}
