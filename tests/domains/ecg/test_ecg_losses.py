"""NT-Xent against the SimCLR paper's pseudocode, an analytic value, and its symmetries."""

import math

import pytest
import torch

from metapt.domains.ecg.losses import nt_xent


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """Algorithm 1 of Chen et al. 2020, literally: views 2k-1 and 2k are example k's pair."""
    z = []
    for a, b in zip(z1.tolist(), z2.tolist()):
        z += [a, b]
    n2 = len(z)

    def s(i: int, j: int) -> float:
        dot = sum(x * y for x, y in zip(z[i], z[j]))
        return dot / (math.sqrt(sum(x * x for x in z[i])) * math.sqrt(sum(y * y for y in z[j])))

    def loss(i: int, j: int) -> float:
        denom = sum(math.exp(s(i, k) / tau) for k in range(n2) if k != i)
        return -math.log(math.exp(s(i, j) / tau) / denom)

    return sum(loss(2 * k, 2 * k + 1) + loss(2 * k + 1, 2 * k) for k in range(n2 // 2)) / n2


@pytest.mark.parametrize("tau", [0.5, 0.1, 2.0])
def test_matches_paper_pseudocode(tau):
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert nt_xent(z1, z2, tau).item() == pytest.approx(naive_nt_xent(z1, z2, tau), abs=1e-5)


@pytest.mark.parametrize("n,tau", [(2, 0.5), (4, 0.5), (8, 0.25)])
def test_identical_views_orthogonal_embeddings(n, tau):
    # Each view's partner has similarity 1, the other 2n - 2 views similarity 0, so
    # l = -log(e^(1/tau) / (e^(1/tau) + 2n - 2)) = log(1 + (2n - 2) e^(-1/tau)) for every view.
    z = torch.eye(n, 16) * torch.arange(1.0, n + 1)[:, None]  # norms must not matter
    expected = math.log(1 + (2 * n - 2) * math.exp(-1 / tau))
    assert nt_xent(z, z.clone(), tau).item() == pytest.approx(expected, abs=1e-6)


def test_symmetric_in_the_views_and_invariant_to_batch_order():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)
    perm = torch.randperm(7, generator=g)
    base = nt_xent(z1, z2)
    torch.testing.assert_close(nt_xent(z2, z1), base)
    torch.testing.assert_close(nt_xent(z1[perm], z2[perm]), base)
    assert not torch.allclose(nt_xent(z1, z2[perm]), base)  # pairs matter


def test_twice_differentiable():
    g = torch.Generator().manual_seed(3)
    z1 = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    z2 = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: nt_xent(a, b, 0.5), (z1, z2))


@pytest.mark.parametrize(
    "args,err",
    [
        ((torch.randn(4, 3), torch.randn(4, 2)), ValueError),
        ((torch.randn(4), torch.randn(4)), ValueError),
        ((torch.randn(1, 3), torch.randn(1, 3)), ValueError),
        ((torch.randn(4, 3), torch.randn(4, 3), 0.0), ValueError),
        ((torch.randn(4, 3), torch.randn(4, 3), float("nan")), ValueError),
        ((torch.randn(4, 3), torch.randn(4, 3), True), TypeError),
        (([[1.0]], torch.randn(1, 1)), TypeError),
    ],
)
def test_rejects_bad_arguments(args, err):
    with pytest.raises(err):
        nt_xent(*args)
