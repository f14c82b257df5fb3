"""Bring your own model, loss and dataset: a federated run through the Python API.

Run: python examples/own_model.py
"""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedguard import Config, Experiment

# Any map-style dataset of (input, label) pairs works; here a small synthetic one.
g = torch.Generator().manual_seed(0)
x = torch.randn(2000, 20, generator=g)
y = (x[:, :5].sum(1) > 0).long()
train, test = TensorDataset(x[:1600], y[:1600]), TensorDataset(x[1600:], y[1600:])

model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))

config = Config.load(
    None,
    [
        "run.rounds=10",
        "data.num_clients=8",
        "data.partition=dirichlet",
        "data.alpha=0.5",
        "server.optimizer=fedadam",
        "server.lr=0.01",
        "train.lr=0.05",
        "run.out_dir=runs",
    ],
)
result = Experiment(config, model=model, loss_fn=nn.functional.cross_entropy, train=train, test=test).run()
print(f"test accuracy {result.final['test_accuracy']:.3f}; run folder {result.run_dir}")
