"""task=embed (bi-encoder) and task=rerank (cross-encoder): the losses, the gather of negatives over workers, the
refusals, and real runs whose exports load with sentence-transformers and transformers."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import compose, read_jsonl, train_in_one_worker_group
from orchestrator.driver import make_plan, train
from orchestrator.errors import ConfigError, DataError
from orchestrator.worker.retrieval_task import RerankModel, ranking_loss

LOCAL = ["launcher=local", "compute=cpu1", "engine=torch", "model=tiny"]


def _job(task: str, *extra: str) -> list[str]:
    return ["experiment=none", *LOCAL, f"task={task}", "task.synthetic=retrieval", "train.max_steps=null",
            "train.epochs=6", "train.eval_every_steps=null", "train.checkpoint_every_steps=1000",
            "train.log_every_steps=5", "optim.lr=1e-3", "train.global_batch_size=32", "train.micro_batch_size_per_gpu=32",
            "task.max_seq_length=64", "task.max_query_length=16", *extra]


# ---------------------------------------------------------------- the losses (no training)


def test_ranking_loss_is_cross_entropy_over_scaled_cosines():
    torch.manual_seed(0)
    q, d = torch.randn(3, 8), torch.randn(5, 8)
    loss, correct = ranking_loss(q, d, 20.0, offset=2)
    scores = 20.0 * F.cosine_similarity(q[:, None], d[None], dim=-1)
    assert loss.item() == pytest.approx(F.cross_entropy(scores, torch.tensor([2, 3, 4])).item(), rel=1e-5)
    assert correct.item() == int((scores.argmax(-1) == torch.tensor([2, 3, 4])).sum())


def _rerank(loss: str):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     num_labels=1)
    return RerankModel(BertForSequenceClassification(cfg), group=3, loss=loss)


@pytest.mark.parametrize("kind", ["listwise", "pointwise"])
def test_rerank_losses_target_the_first_pair_of_each_group(kind):
    model = _rerank(kind).eval()
    ids = torch.randint(1, 50, (6, 10))
    kw = dict(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids))
    out = model(**kw, grouped=torch.ones(1))
    s = model(**kw)["logits"].view(2, 3)
    want = (F.cross_entropy(s, torch.zeros(2, dtype=torch.long)) if kind == "listwise"
            else F.binary_cross_entropy_with_logits(s, torch.tensor([[1.0, 0, 0], [1.0, 0, 0]])))
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    assert out["count"].item() == 2 and out["correct"].item() == int((s.argmax(-1) == 0).sum())


def _gather_worker(rank: int, q, d, port: int, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from orchestrator.worker.dist import Dist

    mine_q = q[rank * 2:(rank + 1) * 2].clone().requires_grad_()
    mine_d = d[rank * 3:(rank + 1) * 3].clone().requires_grad_()
    loss, _ = ranking_loss(mine_q, Dist.current().all_gather_grad(mine_d), 20.0, offset=rank * 3)
    loss.backward()
    out.put((rank, loss.item(), mine_q.grad.tolist(), mine_d.grad.tolist()))
    dist.destroy_process_group()


def test_negatives_gathered_over_two_workers_give_the_one_process_loss_and_gradients():
    """World size 2 (gloo): each worker's 2 queries rank against all 6 passages of both workers, and the mean of
    the workers' losses and their averaged gradients (what data parallelism applies) equal one process holding the
    whole batch, passages in gathered order."""
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(0)
    q, d = torch.randn(4, 8), torch.randn(6, 8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_gather_worker, args=(r, q, d, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    res = sorted((out.get(timeout=120) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
    one_q, one_d = q.clone().requires_grad_(), d.clone().requires_grad_()
    scores = 20.0 * F.normalize(one_q, dim=-1) @ F.normalize(one_d, dim=-1).T
    whole = F.cross_entropy(scores, torch.tensor([0, 1, 3, 4]))  # worker r's query j -> passage 3r + j
    whole.backward()
    assert (res[0][1] + res[1][1]) / 2 == pytest.approx(whole.item(), rel=1e-6)
    local_only = ranking_loss(q[:2], d[:3], 20.0, 0)[0].item()
    assert abs(res[0][1] - local_only) > 1e-3, "worker 0 saw more passages than its own"
    torch.testing.assert_close(torch.tensor(res[0][2] + res[1][2]) / 2, one_q.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(res[0][3] + res[1][3]) / 2, one_d.grad, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- refusals (before any worker)


def test_an_embedding_job_with_batch_1_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train.micro_batch_size_per_gpu.*in-batch|batch of 1"):
        make_plan(compose(_job("embed", "train.global_batch_size=1", "train.micro_batch_size_per_gpu=1")),
                  run_dir=str(tmp_path / "r"))


def test_rerank_without_negatives_and_foreign_synthetic_data_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="task.hard_negatives"):
        make_plan(compose(_job("rerank", "task.hard_negatives=0")), run_dir=str(tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"task.synthetic.*embed \| rerank, not classify"):
        make_plan(compose(["experiment=none", *LOCAL, "task=classify", "task.synthetic=retrieval"]),
                  run_dir=str(tmp_path / "b"))


def test_a_pairs_file_with_a_missing_column_and_a_missing_beir_dir_are_refused(tmp_path):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("question\tpositive\nwhat\tthat\n")
    beir = tmp_path / "beir"
    common = ["experiment=none", *LOCAL, "task=embed", f"task.train_file={pairs}"]
    with pytest.raises(DataError, match=r"beir.*not a BEIR dir"):
        make_plan(compose([*common, f"task.eval_file={beir}"]), run_dir=str(tmp_path / "a"))
    from orchestrator.data.retrieval import RetrievalSet, write_beir

    write_beir(RetrievalSet(corpus={"d1": "that"}, queries={"q1": "what"}, qrels={"q1": {"d1": 1}}), beir)
    with pytest.raises(DataError, match=r"pairs.tsv.*query"):
        make_plan(compose([*common, f"task.eval_file={beir}"]), run_dir=str(tmp_path / "b"))


# ---------------------------------------------------------------- real runs (one process)


@pytest.fixture(scope="module")
def embed_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("embed") / "run"
    return run_dir, train(compose(_job("embed", "task.hard_negatives=1")), run_dir=str(run_dir), interactive=False)


@pytest.mark.slow  # trains a real model
def test_embedding_learns_to_retrieve_and_reports_bm25_beside_it(embed_run):
    run_dir, summary = embed_run
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < 0.6 * losses[0]
    ev = summary["final_eval"]
    for k in ("recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10", "ndcg_at_10"):
        assert 0.0 <= ev[f"eval_{k}"] <= 1.0 and 0.0 <= ev[f"eval_bm25_{k}"] <= 1.0
    n_docs = len(json.loads((run_dir / "data" / "features.json").read_text())["eval_extra"]["doc_ids"])
    assert ev["eval_recall_at_10"] > 3 * 10 / n_docs, "far above a random ranking"
    assert summary["main_metric"] == "eval_ndcg_at_10"


@pytest.mark.slow  # trains a real model
def test_embedding_export_loads_with_sentence_transformers_and_embeds_like_the_run(embed_run):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    run_dir, _ = embed_run
    export = run_dir / "export"
    st = SentenceTransformer(str(export), device="cpu")
    texts = ["alpha beta gamma", "a longer sentence about something else entirely"]
    ours = st.encode(texts, convert_to_tensor=True)
    tok, hf = AutoTokenizer.from_pretrained(str(export)), AutoModel.from_pretrained(str(export)).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = hf(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(ours, (hidden * m).sum(1) / m.sum(1), atol=1e-5, rtol=1e-4)
    card = (export / "README.md").read_text()
    assert "pipeline_tag: sentence-similarity" in card and "library_name: sentence-transformers" in card
    assert 'SentenceTransformer("path/to/export")' in card


@pytest.mark.slow  # trains a real model
def test_reranker_learns_to_rank_its_positive_first_and_loads_as_a_cross_encoder(tmp_path):
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    summary = train(compose(_job("rerank", "task.rerank_top_k=10", "task.hard_negatives=1", "train.epochs=8",
                                 "optim.lr=2e-3", "task.synthetic_train=320")),
                    run_dir=str(tmp_path / "run"), interactive=False)
    recs = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    # groups of 2 (positive, BM25-mined negative): chance is loss ln 2 = 0.693 and accuracy 0.5
    assert sum(r["loss"] for r in recs[-3:]) / 3 < 0.8 * recs[0]["loss"], [r["loss"] for r in recs]
    assert sum(r["train_acc"] for r in recs[-3:]) / 3 > 0.65
    ev = summary["final_eval"]
    feats = json.loads((tmp_path / "run" / "data" / "features.json").read_text())["eval_extra"]
    assert len(feats["candidates"]) == 10 * len(feats["query_ids"])
    # the reranked lists are BM25's top 10 in another order: same recall@10, every metric beside BM25's
    assert ev["eval_recall_at_10"] == pytest.approx(ev["eval_bm25_recall_at_10"])
    assert {f"eval_{k}" for k in ("mrr_at_10", "ndcg_at_10", "recall_at_1")} <= ev.keys()
    export = tmp_path / "run" / "export"
    ce = CrossEncoder(str(export), device="cpu")
    q, doc = feats["candidates"][0]
    tok = AutoTokenizer.from_pretrained(str(export))
    hf = AutoModelForSequenceClassification.from_pretrained(str(export)).eval()
    assert hf.config.num_labels == 1
    preds = read_jsonl(tmp_path / "run" / "predictions_eval.jsonl")
    assert {p["query_id"] for p in preds} == set(feats["query_ids"])
    beir = tmp_path / "run" / "data" / "synthetic" / "eval"
    queries = {json.loads(x)["_id"]: json.loads(x)["text"] for x in (beir / "queries.jsonl").read_text().splitlines()}
    corpus = {json.loads(x)["_id"]: json.loads(x) for x in (beir / "corpus.jsonl").read_text().splitlines()}
    text = corpus[doc]["text"] if not corpus[doc].get("title") else f"{corpus[doc]['title']}. {corpus[doc]['text']}"
    with torch.no_grad():
        direct = hf(**tok(queries[q], text, truncation="only_second", max_length=64, return_tensors="pt")).logits
    assert float(ce.predict([(queries[q], text)], activation_fn=torch.nn.Identity())[0]) == pytest.approx(
        float(direct[0, 0]), abs=1e-4)


# ---------------------------------------------------------------- 2 Ray workers, ZeRO-2


@pytest.mark.slow
def test_two_ray_workers_rank_against_both_workers_passages(ray_cluster, tmp_path):
    """ZeRO-2 on 2 workers with a micro batch of 4: the first step's loss is the one-process loss over the same 8
    queries and 8 passages (not over 4), and the run follows the one-process curve."""
    common = ["task.synthetic_train=64", "train.max_steps=6", "train.epochs=null", "train.global_batch_size=8",
              "train.log_every_steps=1", "model.hidden_dropout_prob=0", "model.attention_probs_dropout_prob=0"]
    cfg = compose(_job("embed", *common, "launcher=ray", "compute=cpu2", "engine=zero2",
                       "train.micro_batch_size_per_gpu=4"))
    train_in_one_worker_group([(cfg, tmp_path / "ray")])
    train(compose(_job("embed", *common, "train.micro_batch_size_per_gpu=8")), run_dir=str(tmp_path / "one"),
          interactive=False)
    curve = lambda name: [r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r]  # noqa: E731
    ray_curve, one_curve = curve("ray"), curve("one")
    assert len(ray_curve) == len(one_curve) == 6
    for a, b in zip(ray_curve, one_curve):
        assert a == pytest.approx(b, rel=1e-4)


# ---------------------------------------------------------------- bench/squad_real.py (needs ../shared/data)


@pytest.mark.slow  # four CLI jobs
def test_squad_bench_runs_every_stage_at_a_tiny_budget(tmp_path):
    """The command bench/README.md documents, at a few steps a stage: both tables and every figure present."""
    import subprocess
    import sys

    from conftest import REPO

    data = REPO.parent / "shared" / "data"
    if not (data / "squad-v2-subset" / "dev-4articles.json").is_file():
        pytest.skip("no ../shared/data/squad-v2-subset here")
    out = tmp_path / "squad.json"
    res = subprocess.run([sys.executable, "bench/squad_real.py", "--model", "tiny", "--pretrain-steps", "4",
                          "--epochs", "0.1", "--qa-epochs", "0.05", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "BERT_ORCH_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["data"]["corpus_docs"] == 148 and r["data"]["eval_queries"] > 50
    for name in ("bm25", "embed", "bm25_top20_reranked"):
        assert set(r["retrieval"][name]) == {"recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10", "ndcg_at_10"}
    assert {"exact", "f1", "HasAns_f1", "NoAns_exact", "no_answer_baseline_f1"} <= r["qa"].keys()
    assert "| bm25 |" in res.stdout and "| always no answer |" in res.stdout
