"""Hugging Face Hub ids in train.init_from and tokenizer.path: fetched while planning when online, so the plan (and
every worker) holds local paths; refused in one line when offline. No network here: the download is a stand-in
that returns a local BERT dir, as huggingface_hub.snapshot_download returns its cache dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import compose
from orchestrator.driver import make_plan
from orchestrator.errors import ConfigError

FT = ["experiment=none", "task=classify", "task.synthetic=category", "launcher=local", "compute=cpu1", "engine=torch"]


def _tiny_bert(d: Path) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    from orchestrator.data.tokenizer import train_wordpiece

    tok = train_wordpiece(iter(["the dog barks", "the cat meows"] * 20), 120, 1, True)
    tok.save_pretrained(str(d))
    cfg = BertConfig(vocab_size=len(tok.get_vocab()), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertForMaskedLM(cfg).save_pretrained(str(d))
    return d


def test_a_hub_id_is_refused_in_one_line_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        make_plan(compose([*FT, "train.init_from=google-bert/bert-base-uncased"]), run_dir=str(tmp_path / "r"), prepare=False)
    assert str(err.value) == ("config key 'train.init_from': 'google-bert/bert-base-uncased' is not a local directory,"
                              " and as a Hugging Face Hub id it needs the network: HF_HUB_OFFLINE is set (unset it, or"
                              " give a local directory)")
    with pytest.raises(ConfigError, match=r"config key 'train\.init_from': '\./nowhere' is neither a local directory"):
        make_plan(compose([*FT, "train.init_from=./nowhere"]), run_dir=str(tmp_path / "r"), prepare=False)


def test_online_a_hub_id_becomes_its_local_snapshot_in_the_plan(tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = _tiny_bert(tmp_path / "hub_cache" / "snapshots" / "abc123")
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(snapshot)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    plan, _ = make_plan(compose([*FT, "train.init_from=acme/tiny-bert", "tokenizer=dir", "tokenizer.path=acme/tiny-bert"]),
                        run_dir=str(tmp_path / "r"), prepare=False)
    assert plan.job.train.init_from == str(snapshot) and plan.job.tokenizer.path == str(snapshot)
    assert [c[0] for c in calls] == ["acme/tiny-bert", "acme/tiny-bert"]
    assert "*.safetensors" in calls[0][1] and not any(p.endswith((".h5", ".msgpack")) for p in calls[0][1])

    def unreachable(repo_id, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(ConfigError, match=r"^config key 'train\.init_from': cannot download 'acme/other' from the Hugging"
                                          r" Face Hub: OSError: We couldn't connect"):
        make_plan(compose([*FT, "train.init_from=acme/other"]), run_dir=str(tmp_path / "r2"), prepare=False)


def test_push_uploads_the_export_with_its_model_card_or_says_why_not(tmp_path, monkeypatch):
    import subprocess
    import sys

    import huggingface_hub

    from conftest import REPO
    from orchestrator.push import push

    run = tmp_path / "run"
    _tiny_bert(run / "export")
    (run / "export" / "README.md").write_text("---\nlibrary_name: transformers\n---\n# run\n")
    out = subprocess.run([sys.executable, "-m", "orchestrator", "push", str(run), "acme/tiny"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)  # the tests run with HF_HUB_OFFLINE=1
    assert out.returncode == 2 and out.stderr == f"error: {run}: HF_HUB_OFFLINE is set: unset it to push to the Hugging Face Hub\n"

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return type("Info", (), {"commit_url": "https://huggingface.co/acme/tiny/commit/1"})()

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push(str(run), "acme/tiny", private=True) == "https://huggingface.co/acme/tiny/commit/1"
    assert calls[0] == ("create", "acme/tiny", True, True)
    assert calls[1][0] == "upload" and {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(calls[1][2])
