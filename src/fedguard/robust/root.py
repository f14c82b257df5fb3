"""FLTrust's server side: the root dataset and the server's own update trained on it (Cao et al. 2021).

The root dataset is a small clean set the server operator collects itself (Cao et al. use 100 examples).
fedguard reads it from a file (``robust.root_data``): it must be held out of every client's data and
never be the test set, or the run's test accuracy stops meaning anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedguard.algorithms.local_sgd import LocalSGD, ShuffledEpochs
from fedguard.core.communicator import client_generator
from fedguard.core.pipeline import ConfigurationError
from fedguard.core.types import Params
from fedguard.data.arrays import ArrayDataset
from fedguard.data.files import EXAMPLE_FILE_SUFFIXES, load_examples
from fedguard.tasks.base import Task

from .defenses import FLTrust


def load_root_data(path: str | Path) -> ArrayDataset:
    """Examples from ``.npz`` (arrays ``x``, ``y``; no pickle) or ``.safetensors``; uint8 pixels scaled to [0, 1]."""
    if Path(path).suffix not in EXAMPLE_FILE_SUFFIXES:
        raise ConfigurationError(f"robust.root_data={path}: use an .npz or .safetensors file with arrays x and y")
    return load_examples(path, "fltrust-root")


def save_root_data(data: ArrayDataset, path: str | Path) -> Path:
    """Write ``data`` as a root-data file (safetensors) that :func:`load_root_data` reads back."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file({"x": data.x.contiguous(), "y": data.y.contiguous()}, str(path))
    return path


class ServerRootUpdate:
    """The server's update on the root data: the clients' local training, from the global model."""

    def __init__(self, task: Task, model: torch.nn.Module, root: ArrayDataset, trainer: Any, seed: int) -> None:
        self.task, self.model, self.root, self.trainer, self.seed = task, model, root, trainer, seed
        self.round = 0

    def __call__(self, params: Params) -> Params:
        self.round += 1
        start = {k: v.detach().float() for k, v in params.items()}
        gen = client_generator(self.seed, self.round, -1, "fltrust-root")
        trained, _ = self.task.local_train(self.model, start, self.root, self.trainer, gen)
        return {k: trained[k] - start[k] for k in start}


def fltrust_rule(r: Any, ctx: Any) -> FLTrust:
    """FLTrust for the run being built: root data from ``robust.root_data``, the clients' optimiser."""
    if not r.root_data:
        raise ConfigurationError(
            "robust.rule=fltrust needs the server's root dataset: set robust.root_data to an .npz/.safetensors "
            "file of about 100 clean examples held out of the clients' data (never the test set)"
        )
    try:
        root = load_root_data(r.root_data)
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigurationError(f"robust.root_data={r.root_data}: cannot read it ({exc})") from exc
    t = ctx.config.train
    trainer = LocalSGD(lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                       steps_limit=t.max_steps or None, sampler=ShuffledEpochs(t.epochs, t.batch_size))
    from fedguard.builders import seeded_model

    model = seeded_model(ctx.task, ctx.config.run.seed)
    return FLTrust(ServerRootUpdate(ctx.task, model, root, trainer, ctx.config.run.seed))
