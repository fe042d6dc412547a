"""Run by tests/test_distributed.py under torchrun (and alone, for the single-process reference): trains with the
settings given as JSON and SGD or fastcls's default optimizer, and leaves the run folder for the test to compare.

    python tests/distributed_worker.py '{"model": ..., "output": ..., ...}' sgd|adamw
"""
import json
import sys

import torch

import fastcls

if __name__ == "__main__":
    settings, optimizer = json.loads(sys.argv[1]), sys.argv[2]
    # SGD keeps the comparison linear in the gradients: Adam's m / sqrt(v) turns rounding noise in a near-zero
    # gradient into a full step of either sign
    factory = (lambda groups: torch.optim.SGD(groups, lr=settings["lr"])) if optimizer == "sgd" else None
    fastcls.train(**settings, optimizer=factory)
