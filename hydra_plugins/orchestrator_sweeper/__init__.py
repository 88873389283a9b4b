"""Hydra sweeper plugin: non-grid search with Optuna 4 (`hydra/sweeper=optuna_search`), trials run by any launcher."""
