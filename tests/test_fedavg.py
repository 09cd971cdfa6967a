import pytest
import torch

from ubsmoe.methods.fedavg import fedavg


def test_fedavg_is_the_weighted_mean():
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.ones(2, 2)}
    b = {"x": torch.tensor([3.0, 6.0]), "y": torch.zeros(2, 2)}
    out = fedavg([a, b], [1, 3])
    torch.testing.assert_close(out["x"], torch.tensor([2.5, 5.0]))
    torch.testing.assert_close(out["y"], torch.full((2, 2), 0.25))


def test_fedavg_rejects_mismatched_clients():
    with pytest.raises(ValueError, match="keys"):
        fedavg([{"x": torch.zeros(1)}, {"z": torch.zeros(1)}], [1, 1])
    with pytest.raises(ValueError, match="different shapes"):
        fedavg([{"x": torch.zeros(1)}, {"x": torch.zeros(2)}], [1, 1])
    with pytest.raises(ValueError, match="at least one"):
        fedavg([], [])
