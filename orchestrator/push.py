"""`bert-orch push RUN_DIR REPO_ID [--private]`: a run's export/ (weights, tokenizer, model card) to the Hugging
Face Hub, with huggingface_hub's own upload (the token comes from `hf auth login` or HF_TOKEN, never from a config).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from orchestrator.errors import DataError


def push(run_dir: str, repo_id: str, private: bool = False) -> str:
    export = Path(run_dir) / "export"
    if not (export / "config.json").is_file():
        raise DataError(str(run_dir), "holds no export/ with config.json (a finished run writes one)")
    from orchestrator.plan.inputs import hub_offline

    if hub_offline():
        raise DataError(str(run_dir), "HF_HUB_OFFLINE is set: unset it to push to the Hugging Face Hub")
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(export), repo_id=repo_id,
                             commit_message=f"bert-orchestrator export of {Path(run_dir).resolve().name}")
    return str(getattr(info, "commit_url", info))


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="bert-orch push", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a finished run dir (its export/ is uploaded)")
    ap.add_argument("repo_id", help="the Hub repo, e.g. my-org/bert-tiny-sst2 (created if missing)")
    ap.add_argument("--private", action="store_true", help="create the repo private")
    args = ap.parse_args(argv)
    try:
        url = push(args.run_dir, args.repo_id, args.private)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - auth, network, permissions: one line
        print(f"error: cannot push {args.run_dir} to {args.repo_id}: {type(exc).__name__}: {str(exc).splitlines()[0]}",
              file=sys.stderr)
        sys.exit(2)
    print(f"pushed {Path(args.run_dir) / 'export'} -> {url}")
