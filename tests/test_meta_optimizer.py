"""metapt.meta_optimizer.ApplyIfFinite: φ's optimiser behind the skip / densify / reduce policy."""

import math

import torch

from metapt.meta_optimizer import ApplyIfFinite
from metapt.optim import LazyAdam

RTOL, ATOL = 1e-6, 1e-7


def _phi(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, generator=g, dtype=torch.float64).requires_grad_(True),
            "rows": torch.randn(6, 2, generator=g, dtype=torch.float64).requires_grad_(True)}


def _grad(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, generator=g, dtype=torch.float64),
            "rows": torch.randn(6, 2, generator=g, dtype=torch.float64)}


def _row_sparse(dense: torch.Tensor, rows: list[int]) -> torch.Tensor:
    index = torch.tensor([rows])
    return torch.sparse_coo_tensor(index, dense[rows], dense.shape, check_invariants=True)


def test_a_finite_hypergradient_is_one_plain_step_of_the_optimiser():
    phi, ref = _phi(), _phi()
    h = _grad()
    update = ApplyIfFinite(torch.optim.SGD(list(phi.values()), lr=0.1), phi)
    applied, norm = update.step(h)
    for k, v in ref.items():
        with torch.no_grad():
            v -= 0.1 * h[k]
    assert applied and math.isclose(norm, math.sqrt(sum(float((v ** 2).sum()) for v in h.values())), rel_tol=RTOL)
    for k in phi:
        torch.testing.assert_close(phi[k], ref[k], rtol=RTOL, atol=ATOL)


def test_unusable_non_finite_or_vetoed_hypergradients_leave_phi_and_the_optimiser_alone():
    phi = _phi()
    before = {k: v.detach().clone() for k, v in phi.items()}
    opt = torch.optim.Adam(list(phi.values()), lr=0.1)
    update = ApplyIfFinite(opt, phi)
    bad = {**_grad(), "w": torch.tensor([1.0, math.inf, 0, 0, 0], dtype=torch.float64)}
    results = [update.step(_grad(), usable=False), update.step(bad), update.step(_grad(), keep=False)]
    assert [r.applied for r in results] == [False, False, False]
    assert math.isnan(results[0].norm) and not math.isfinite(results[1].norm) and math.isfinite(results[2].norm)
    assert not opt.state  # no step was taken
    for k in phi:
        assert torch.equal(phi[k].detach(), before[k])


def test_an_unusable_hypergradient_reaches_the_reduction_as_nan():
    """Every process skips alike: the NaN goes through the cross-process mean."""
    seen = []
    phi = _phi()
    update = ApplyIfFinite(torch.optim.SGD(list(phi.values()), lr=0.1), phi, reduce=lambda h: seen.append(h) or h)
    update.step(_grad(), usable=False)
    assert all(bool(torch.isnan(v).all()) for v in seen[0].values())


def test_row_sparse_hypergradients_stay_sparse_for_lazy_optimisers_and_are_densified_for_others():
    h = _grad()
    sparse = {"w": h["w"], "rows": _row_sparse(h["rows"], [1, 4])}
    reduced = []
    lazy_phi, dense_phi, ref_phi = _phi(), _phi(), _phi()
    lazy = ApplyIfFinite(LazyAdam(list(lazy_phi.values()), lr=0.1), lazy_phi, reduce=lambda g: reduced.append(g) or g)
    dense = ApplyIfFinite(torch.optim.Adam(list(dense_phi.values()), lr=0.1), dense_phi)
    ref = torch.optim.Adam(list(ref_phi.values()), lr=0.1)
    assert lazy.step(sparse).applied and dense.step(sparse).applied
    assert reduced[0]["rows"].is_sparse  # the reduction sees the sparse entry as it is
    assert lazy_phi["rows"].grad.is_sparse and not dense_phi["rows"].grad.is_sparse
    for k, v in ref_phi.items():
        v.grad = sparse[k].to_dense()
    ref.step()
    for k in dense_phi:  # torch's Adam on the densified gradient
        torch.testing.assert_close(dense_phi[k], ref_phi[k], rtol=RTOL, atol=ATOL)
    untouched = [0, 2, 3, 5]  # LazyAdam moves only the rows the sparse gradient holds
    assert torch.equal(lazy_phi["rows"].detach()[untouched], _phi()["rows"].detach()[untouched])
    assert not torch.equal(lazy_phi["rows"].detach()[[1, 4]], _phi()["rows"].detach()[[1, 4]])
