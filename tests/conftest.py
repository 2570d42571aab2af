import pytest
import torch


def assert_trees_close(actual, expected, rtol, atol=0.0):
    """Every leaf of two dicts of tensors agrees; one message names the worst key."""
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"[{k}] {m}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
