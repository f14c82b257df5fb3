"""Which device a process computes on: ``run.device = auto | cpu | cuda | cuda:<index>``.

Models, local training (DP-SGD's per-example gradients included) and evaluation run on the
chosen device; client state, aggregation and every message stay on the CPU, so a message
is the same bytes whatever device produced it (safetensors needs CPU memory anyway).
Several simulated clients share one GPU: they run one after another in a worker, and
several workers (forked processes or Ray actors with a fraction of a GPU each) may hold
the same device.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

from fedguard.core.pipeline import ConfigurationError

CUDA_HELP = (
    "install a CUDA build of torch (see README, 'GPU'), or use run.device = 'cpu' or 'auto' "
    "(auto falls back to the CPU)"
)


def resolve_device(spec: str) -> torch.device:
    """The torch device ``spec`` names on this machine, or a :class:`ConfigurationError` saying why not.

    ``auto`` is ``cuda`` when a CUDA device is visible, else ``cpu``. Checking availability
    does not initialise CUDA, so a process may still fork its workers afterwards.
    """
    text = spec.strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text.partition(":")[2]
        if text.count(":") > 1 or (index_text and not index_text.isdigit()):
            raise ConfigurationError(f"run.device: {spec!r} is not a device; use cuda or cuda:<index> (e.g. cuda:0)")
        if not torch.cuda.is_available():
            raise ConfigurationError(f"run.device: {spec!r} but this torch sees no CUDA device "
                                     f"(torch {torch.__version__}); {CUDA_HELP}")
        index = int(index_text) if index_text else 0
        count = torch.cuda.device_count()
        if index >= count:
            raise ConfigurationError(f"run.device: {spec!r} but only {count} CUDA device(s) are visible "
                                     f"(cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    raise ConfigurationError(f"run.device: {spec!r} is not a device; choose auto, cpu, cuda or cuda:<index>")


def check_device_spec(spec: str) -> None:
    """Check the form of ``spec`` without needing the device here (a Ray head may have no GPU)."""
    text = spec.strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return
    if text.startswith("cuda:") and text[5:].isdigit():
        return
    raise ConfigurationError(f"run.device: {spec!r} is not a device; choose auto, cpu, cuda or cuda:<index>")


#: built-in tasks whose local training draws noise on the CPU (they refuse other devices)
CPU_ONLY_TASKS = frozenset({"vae", "mae", "gan"})

_MODEL_COPIES: weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module]] = weakref.WeakKeyDictionary()


def model_on(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model`` itself when it already lives on ``device``, else one copy of it there, made once per process.

    Training and evaluation are functional (parameters are passed in), so the copy serves only
    as the architecture and the home of buffers; the original stays where it was, for the
    server's CPU-side work (reports, final metrics).
    """
    device = torch.device(device)
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device == device for t in tensors):
        return model
    copies = _MODEL_COPIES.setdefault(model, {})
    if str(device) not in copies:
        copies[str(device)] = copy.deepcopy(model).to(device)
    return copies[str(device)]


def params_to(params: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The same parameters on ``device`` (the very tensors when they are there already)."""
    return {k: v.to(device) for k, v in params.items()}
