"""`python -m orchestrator <overrides>`: the Hydra app."""

from orchestrator.cli import main

main()
