"""Hydra launcher plugin: every sweep member is a Ray Job on the cluster (`hydra/launcher=ray_jobs`)."""
