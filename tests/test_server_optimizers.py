"""Server optimisers against the update formulas of Reddi et al. 2021 (Algorithm 2)."""

import math

import pytest
import torch

from fedguard.algorithms.server_optimizers import (
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedAvgServer,
    FedYogi,
    build_server_optimizer,
)

DELTAS = [0.5, -0.2, 0.3, 0.05]


def scalar_run(opt, x0=1.0):
    params = {"w": torch.tensor([x0], dtype=torch.float64)}
    xs = []
    for d in DELTAS:
        params = opt.step(params, {"w": torch.tensor([d], dtype=torch.float64)})
        xs.append(float(params["w"]))
    return xs


def reference(kind, eta, b1, b2, tau, x0=1.0):
    """The paper's recursions written out with plain floats."""
    m, v, x, out = 0.0, tau**2, x0, []
    for d in DELTAS:
        m = b1 * m + (1 - b1) * d
        if kind == "adagrad":
            v = v + d * d
        elif kind == "adam":
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d) if v != d * d else v
        x = x + eta * m / (math.sqrt(v) + tau)
        out.append(x)
    return out


@pytest.mark.parametrize("cls,kind", [(FedAdagrad, "adagrad"), (FedAdam, "adam"), (FedYogi, "yogi")])
def test_adaptive_optimisers_follow_paper(cls, kind):
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    got = scalar_run(cls(eta, b1, b2, tau))
    assert got == pytest.approx(reference(kind, eta, b1, b2, tau), rel=1e-12)


def test_fedavg_adds_scaled_delta():
    assert scalar_run(FedAvgServer(lr=0.5)) == pytest.approx([1.25, 1.15, 1.3, 1.325])


def test_fedavgm_momentum_recursion():
    m, x, ref = 0.0, 1.0, []
    for d in DELTAS:
        m = 0.9 * m + d
        x += 1.0 * m
        ref.append(x)
    assert scalar_run(FedAvgM(1.0, 0.9)) == pytest.approx(ref)


def test_state_roundtrip_continues_identically():
    a = FedAdam(0.1)
    p = {"w": torch.ones(3)}
    p = a.step(p, {"w": torch.full((3,), 0.2)})
    b = FedAdam(0.1)
    b.load_state_dict(a.state_dict())
    d = {"w": torch.tensor([0.1, -0.3, 0.0])}
    assert torch.equal(a.step(p, d)["w"], b.step(p, d)["w"])


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="fedadam"):
        build_server_optimizer("adamw", 1, 0.9, 0.9, 0.99, 1e-3)
