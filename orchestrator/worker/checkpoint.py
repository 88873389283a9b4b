"""Worker stage: checkpoints written to a temporary name and renamed only when complete; newest good one resumed.

The manifest records each file's size and SHA-256. Scanning (rotation, the driver's resume check) compares sizes;
the checkpoint a job is about to load is verified byte for byte, and a damaged one (a flipped byte in a shard, an
unreadable trainer_state.json) is skipped for the previous one with a warning. A new checkpoint is fsynced,
renamed and the rename fsynced before any older one is deleted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from orchestrator.io import fsync_tree, replace_dir, sha256_file, write_json_atomic

log = logging.getLogger("orchestrator.checkpoint")

_STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
STATE = "trainer_state.json"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    state: dict[str, Any]


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def _file_list(directory: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def verify(directory: Path, checksums: bool = False) -> Optional[str]:
    """None when the manifest's files are all present with their recorded sizes (and, with `checksums`, their
    SHA-256), else why not."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return "no manifest (incomplete write)"
    try:
        recorded = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable manifest: {exc}"
    for name, rec in recorded.items():
        rec = rec if isinstance(rec, dict) else {"size": rec}  # manifests before checksums: sizes only
        f = directory / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != rec["size"]:
            return f"file {name} is {f.stat().st_size} bytes, manifest says {rec['size']}"
        if checksums and "sha256" in rec and sha256_file(f) != rec["sha256"]:
            return f"file {name} does not match its SHA-256 in the manifest (damaged)"
    return None


def read_checkpoint(path: Path, checksums: bool = False) -> tuple[Optional[CheckpointInfo], Optional[str]]:
    """(the checkpoint, None) when it is whole and its trainer state readable, else (None, why not)."""
    problem = verify(path, checksums)
    if problem is None:
        try:
            state = json.loads((path / STATE).read_text())
            return CheckpointInfo(path, int(_STEP_DIR.match(path.name).group(1)), state), None
        except (OSError, ValueError) as exc:
            problem = f"unreadable {STATE}: {exc}"
    return None, problem


def find_latest(run_dir: str | os.PathLike, warn: Callable[[str], None] = log.warning,
                checksums: bool = False) -> Optional[CheckpointInfo]:
    """Newest complete checkpoint; newer incomplete or damaged ones are skipped with a warning. `checksums`
    verifies every byte (for the checkpoint about to be loaded); without it sizes are compared."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    steps = sorted(
        ((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()),
        reverse=True,
    )
    for _, path in steps:
        info, problem = read_checkpoint(path, checksums)
        if info is not None:
            return info
        warn(f"skipping checkpoint {path}: {problem}")
    return None


def save(
    run_dir: str | os.PathLike,
    step: int,
    rank: int,
    barrier: Callable[[], None],
    write_shards: Callable[[Path], None],
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Collective: every rank writes its shards into step_N.tmp; rank 0 adds state + manifest and renames."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    write_shards(tmp)
    barrier()
    if rank == 0:
        write_json_atomic(tmp / STATE, trainer_state)
        write_json_atomic(tmp / MANIFEST, {"step": step, "files": _file_list(tmp)})
        fsync_tree(tmp)
        replace_dir(tmp, final)  # fsyncs the rename: it is durable before any older checkpoint goes
        _rotate(root, keep_last)
    barrier()
    return final


def _rotate(root: Path, keep_last: int) -> None:
    steps = sorted(
        ((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()),
        reverse=True,
    )
    good = [p for _, p in steps if verify(p) is None]
    for p in good[keep_last:]:
        shutil.rmtree(p, ignore_errors=True)


UNIVERSAL_TAG = "ds_universal"


def _deepspeed_safe_globals() -> list:
    """The only classes DeepSpeed 0.19.8's ZeRO checkpoints pickle besides tensors and builtins (found by loading
    stage 0-3 checkpoints with weights_only=True); plain data holders, rebuilt without running their code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads():
    """Inside, every torch.load runs with weights_only=True (whatever its caller passed) and only DeepSpeed's few
    data classes allowed: whoever can write a shared run dir cannot run code in the workers through DeepSpeed's
    own loads, which pass weights_only=False."""
    import torch

    original = torch.load
    allowed = _deepspeed_safe_globals()

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _convert_to_universal_main(argv: list[str]) -> None:
    """`python -m orchestrator.worker.checkpoint <ds_to_universal args>`: DeepSpeed's converter with safe loads."""
    import runpy
    import sys

    sys.argv = ["ds_to_universal", *argv]
    with weights_only_loads():
        runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__")


def ensure_universal(ckpt_dir: Path, rank: int, barrier: Callable[[], None], tag: str = "ds") -> tuple[Path, float]:
    """Collective: a DeepSpeed universal copy of ckpt_dir/<tag> (ZeRO state re-shardable to any world size).

    Rank 0 runs DeepSpeed's converter once into a temporary dir under the checkpoint and renames it when
    complete (a crash mid-way leaves no half copy); the others wait. Returns (its path, conversion seconds;
    0 when it was already there).
    """
    import subprocess
    import sys
    import time

    final = ckpt_dir / UNIVERSAL_TAG
    seconds = 0.0
    if rank == 0 and not (final / "zero").is_dir():
        tmp = ckpt_dir / f".{UNIVERSAL_TAG}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.perf_counter()
        cmd = [
            sys.executable, "-m", "orchestrator.worker.checkpoint",  # ds_to_universal, loading weights only
            "--input_folder", str(ckpt_dir / tag), "--output_folder", str(tmp),
            "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1",
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"universal checkpoint conversion of {ckpt_dir} failed:\n{res.stderr[-3000:]}")
        # ZeRO's converter writes latest_universal next to its output; we name the tag explicitly instead
        (ckpt_dir / "latest_universal").unlink(missing_ok=True)
        fsync_tree(tmp)
        replace_dir(tmp, final)
        seconds = time.perf_counter() - t0
        log.info("converted %s to a universal checkpoint in %.1fs", ckpt_dir, seconds)
    barrier()
    return final, seconds


def truncate_ledgers(run_dir: str | os.PathLike, resume_step: int) -> None:
    """Drop ledger lines past the resume step from every rank's file, also of ranks that no longer exist.

    Called by rank 0 alone before any rank writes (then a barrier): after a resize the old group's rank files
    may hold steps that the new group redoes.
    """
    ledger_dir = Path(run_dir) / "ledger"
    if not ledger_dir.is_dir():
        return
    from orchestrator.worker.metrics import truncate_jsonl

    for path in sorted(ledger_dir.glob("rank*.jsonl")):
        truncate_jsonl(path, resume_step)


if __name__ == "__main__":
    import sys

    _convert_to_universal_main(sys.argv[1:])
