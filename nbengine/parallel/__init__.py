"""Tensor and data parallelism: sharding, the collectives, worker processes, replicas."""
