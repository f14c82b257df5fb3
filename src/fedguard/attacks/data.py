"""Data-poisoning attacks: a hostile client trains honestly on data it has altered.

* label flipping (as in Allen-Zhu et al. 2021 and Karimireddy et al. 2022): every label ``y`` becomes
  ``C - 1 - y``;
* BadNets (Gu et al. 2017): a fixed pixel pattern (a bright square in the bottom-right corner) stamped
  on a share of the client's images, whose labels become the attacker's target class. The attack success
  rate (ASR) is the share of triggered test images of *other* classes that the model assigns to the target.

Images are ``(N, C, H, W)`` floats in ``[0, 1]`` (fedguard's :class:`~fedguard.data.arrays.ArrayDataset`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedguard.data.arrays import ArrayDataset


def flip_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label flipping: ``y -> num_classes - 1 - y``."""
    if num_classes < 2:
        raise ValueError(f"label flipping needs at least two classes, got {num_classes}")
    return (num_classes - 1) - labels


@dataclass(frozen=True)
class Trigger:
    """A BadNets pixel pattern: a ``size`` x ``size`` square of ``value`` whose bottom-right corner sits
    ``margin`` pixels from the image's bottom-right corner, on every channel."""

    size: int = 3
    value: float = 1.0
    margin: int = 1

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A copy of the images ``(N, C, H, W)`` with the pattern stamped on."""
        h, w = x.shape[-2], x.shape[-1]
        if self.size < 1 or self.size + self.margin > min(h, w):
            raise ValueError(f"a {self.size}-pixel trigger {self.margin} from the edge does not fit {h}x{w} images")
        out = x.clone()
        bottom, right = h - self.margin, w - self.margin
        out[..., bottom - self.size : bottom, right - self.size : right] = self.value
        return out


def poison_backdoor(
    data: ArrayDataset, trigger: Trigger, target: int, fraction: float, generator: torch.Generator
) -> ArrayDataset:
    """BadNets poisoning of a client's data: ``round(fraction * N)`` examples drawn at random get the
    trigger and the ``target`` label; the rest stay clean (the mix keeps the main task accurate)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the poisoned fraction must be in (0, 1], got {fraction}")
    n = len(data)
    count = max(1, round(fraction * n)) if n else 0
    chosen = torch.randperm(n, generator=generator)[:count]
    x, y = data.x.clone(), data.y.clone()
    x[chosen] = trigger.apply(x[chosen])
    y[chosen] = target
    return _dataset(x, y, f"{data.name}-backdoor")


def flip_dataset(data: ArrayDataset, num_classes: int) -> ArrayDataset:
    """The client's data with every label flipped."""
    return _dataset(data.x, flip_labels(data.y, num_classes), f"{data.name}-flipped")


def triggered_test_set(test: ArrayDataset, trigger: Trigger, target: int) -> ArrayDataset:
    """The test images whose true class is not ``target``, with the trigger stamped on and the target as
    label: a model's accuracy on it is the backdoor's attack success rate."""
    keep = test.y != target
    x = trigger.apply(test.x[keep])
    return _dataset(x, torch.full((int(keep.sum()),), target, dtype=test.y.dtype), f"{test.name}-triggered")


def _dataset(x: torch.Tensor, y: torch.Tensor, name: str) -> ArrayDataset:
    part = object.__new__(ArrayDataset)  # built from a validated dataset: skip the checks
    part.x, part.y, part.name = x, y, name
    return part
