"""FedAvg weighting and the checks every client update passes."""

import pytest
import torch

from fedguard.algorithms.fedavg import UpdateRejected, check_update, weighted_mean
from fedguard.messages import Message


def test_weighted_mean_matches_formula():
    u1, u2, u3 = ({"w": torch.tensor([v, 2 * v])} for v in (1.0, 4.0, -2.0))
    out = weighted_mean([u1, u2, u3], [10, 30, 60])
    expected = (10 * u1["w"] + 30 * u2["w"] + 60 * u3["w"]) / 100
    assert torch.allclose(out["w"], expected)


LIKE = {"w": torch.zeros(2, 3)}


def reply(tensor, round=1, n=5, kind="fit_result"):
    return Message(kind, round, 0, {"num_examples": n}, {"w": tensor})


@pytest.mark.parametrize(
    "msg,match",
    [
        (reply(torch.zeros(3, 2)), "shape"),
        (reply(torch.zeros(2, 3, dtype=torch.float64)), "dtype"),
        (reply(torch.tensor([[float("nan")] * 3] * 2)), "NaN"),
        (reply(torch.tensor([[1.0, 2.0, float("nan")], [-3.0, 0.0, 1.0]])), "NaN"),
        (reply(torch.tensor([[1.0, 2.0, 3.0], [-float("inf"), 0.0, 1.0]])), "infinite"),
        (reply(torch.tensor([[1.0, float("nan"), 3.0], [float("inf"), 0.0, 1.0]])), "NaN"),
        (reply(torch.tensor([[1.0, 2.0, 3.0], [-2e6, 0.0, 1.0]])), "beyond"),
        (reply(torch.zeros(2, 3), round=2), "round"),
        (reply(torch.zeros(2, 3), n=0), "num_examples"),
        (reply(torch.full((2, 3), 1e9)), "beyond"),
        (reply(torch.zeros(2, 3), kind="error"), "fit_result"),
    ],
)
def test_bad_updates_are_rejected_with_reason(msg, match):
    with pytest.raises(UpdateRejected, match=match):
        check_update(msg, LIKE, round=1)


def test_good_update_passes():
    assert torch.equal(check_update(reply(torch.ones(2, 3)), LIKE, 1)["w"], torch.ones(2, 3))
