"""The model card in export/README.md: what the model is, what it was trained on and for how long, its final
evaluation, and how to load it (the Hugging Face Hub reads the same file and its YAML header)."""

from __future__ import annotations

from typing import Any

from orchestrator.config.schema import FINETUNE_TASKS

# task -> (transformers Auto class, pipeline tag)
_LOADERS = {
    "pretrain": ("AutoModelForMaskedLM", "fill-mask"),
    "classify": ("AutoModelForSequenceClassification", "text-classification"),
    "ner": ("AutoModelForTokenClassification", "token-classification"),
    "qa": ("AutoModelForQuestionAnswering", "question-answering"),
    "embed": ("AutoModel", "sentence-similarity"),  # a sentence-transformers dir
    "rerank": ("AutoModelForSequenceClassification", "text-ranking"),  # a cross-encoder (one score per pair)
}


def _data(cfg: dict[str, Any]) -> str:
    task, data = cfg["task"], cfg["data"]
    if task["name"] in FINETUNE_TASKS:
        if task.get("synthetic"):
            return (f"generated `{task['synthetic']}` task ({task['synthetic_train']} training and "
                    f"{task['synthetic_eval']} evaluation examples)")
        return f"training file `{task['train_file']}`, evaluation file `{task['eval_file']}`"
    if data["source"] == "synthetic":
        return f"the built-in synthetic grammar corpus ({data['synthetic_documents']} documents, seed {data['synthetic_seed']})"
    if data["source"] == "prepared":
        return f"the prepared dataset `{data['prepared_dir']}`"
    return ", ".join(f"`{p}`" for p in data.get("paths", [])) or data["source"]


def _use(task: str, auto: str, pipeline_tag: str) -> list[str]:
    if task == "embed":
        return ["from sentence_transformers import SentenceTransformer", "",
                'model = SentenceTransformer("path/to/export")',
                'embeddings = model.encode(["a query", "a passage"])  # cosine similarity ranks passages']
    if task == "rerank":
        return ["from sentence_transformers import CrossEncoder", "",
                'model = CrossEncoder("path/to/export")',
                'scores = model.predict([("a query", "a passage"), ("a query", "another passage")])']
    return [f"from transformers import AutoTokenizer, {auto}, pipeline", "",
            'tokenizer = AutoTokenizer.from_pretrained("path/to/export")',
            f'model = {auto}.from_pretrained("path/to/export")',
            f'pipe = pipeline("{pipeline_tag}", model="path/to/export")']


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


FAMILY_NAMES = {"bert": "BERT", "roberta": "RoBERTa", "albert": "ALBERT", "deberta_v2": "DeBERTa-v3-style (deberta-v2)",
                "modernbert": "ModernBERT", "electra": "ELECTRA"}


def _objective(t: dict[str, Any]) -> str:
    """A pretraining run's objective in one sentence (fine-tuning tasks say theirs in the task name)."""
    if t.get("distill_from"):
        return (f"Distilled from `{t['distill_from']}` (DistilBERT's loss: the teacher's soft targets at temperature"
                f" {t.get('distill_temperature', 2.0)}, masked LM and hidden-state cosine); its layers started as"
                " copies of evenly spread teacher layers.")
    masking = f"{t.get('mlm_probability', 0.15):.0%} of tokens in {t.get('masking', 'token').replace('_', ' ')} units"
    if t.get("objective") == "rtd":
        return (f"Replaced-token detection (ELECTRA / DeBERTa-v3): this is the discriminator; a smaller generator"
                f" trained beside it filled the masked positions ({masking}) and was not exported.")
    heads = [name for key, name in (("nsp", "next-sentence prediction"), ("sop", "sentence-order prediction"),
                                    ("sbo", "SpanBERT's span-boundary objective")) if t.get(key)]
    return f"Masked LM ({masking}, 80/10/10)" + (" with " + " and ".join(heads) if heads else "") + "."


def model_card(plan: dict[str, Any], summary: dict[str, Any]) -> str:
    cfg = plan["config"]
    m, task = cfg["model"], cfg["task"]["name"]
    family = m.get("family", "bert")
    auto, pipeline_tag = _LOADERS.get(task, ("AutoModel", "feature-extraction"))
    if task == "pretrain" and cfg["task"].get("objective") == "rtd":  # the exported discriminator
        auto, pipeline_tag = ("AutoModelForPreTraining" if family == "electra" else "AutoModel"), "feature-extraction"
    init = cfg["train"].get("init_from")
    tokens = summary["steps"] * plan.get("tokens_per_step", 0)
    lines = [
        "---", f"library_name: {'sentence-transformers' if task in ('embed', 'rerank') else 'transformers'}",
        f"pipeline_tag: {pipeline_tag}", "tags:", f"- {family}", f"- {task}",
        "- bert-orchestrator", "---", "",
        f"# {cfg['run_name']}", "",
        f"A {FAMILY_NAMES.get(family, family)} encoder ({m['num_hidden_layers']} layers x {m['hidden_size']} hidden, {m['num_attention_heads']} heads,"
        f" vocabulary {(plan.get('dataset') or {}).get('vocab_size', m.get('vocab_size'))}) trained by bert-orchestrator for"
        f" the `{task}` task: {summary['steps']} optimizer steps at global batch {plan['global_batch_size']}"
        f" (up to {tokens:,} tokens) on {summary['world_size']} worker(s), from "
        + (f"`{init}`." if init else "its teacher." if cfg["task"].get("distill_from") else "a random initialisation."),
        *(["", _objective(cfg["task"])] if task == "pretrain" else []),
        "", "## Data", "", _data(cfg) + ".", "",
        "## Evaluation", "", "| metric | value |", "|---|---|",
    ]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(summary.get("final_eval", {}).items())]
    lines += ["", "## Use", "", "```python", *_use(task, auto, pipeline_tag), "```", "",
        "The run dir holds the full plan (`plan.json`), every logged step (`metrics.jsonl`) and the checkpoints;"
        " `bert-orch report <run dir>` plots them.", "",
    ]
    return "\n".join(lines)
