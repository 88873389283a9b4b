"""Each entry point's --help shows its own groups and keys, and what each key means (from the schema)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def _help(module: str) -> str:
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_training_app_lists_its_groups_and_explains_every_key():
    text = _help("orchestrator")
    assert "  logger: none, tensorboard, wandb" in text and "  experiment: " in text
    assert "  train.global_batch_size = 64\n      Samples per optimizer step over all workers" in text
    assert "  verbose = False\n      Show the libraries' routine logs too" in text
    assert "bert-orch report RUN_DIR" in text


def test_prepare_help_shows_its_own_keys_not_the_training_groups():
    text = _help("orchestrator.prepare")
    assert "  shard_bytes = " in text and "  tokenizer.vocab_size = 30522\n      Vocabulary size to train." in text
    assert "experiment" not in text and "Configuration groups" not in text
