"""Helpers the tests share: launches, the offline W&B reader, a local Slurm cluster, in-process checks."""
