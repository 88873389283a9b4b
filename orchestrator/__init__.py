"""BERT pretraining and fine-tuning orchestrator: Hydra config -> plan -> launcher -> DeepSpeed workers."""

__version__ = "0.1.0"
