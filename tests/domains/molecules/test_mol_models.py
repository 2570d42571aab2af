"""GIN encoder (Hu et al. 2020), multitask head and masked BCE: shapes, invariances, functional_call, HVPs."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from torch_geometric.data import Batch

from metapt.domains.molecules import smiles_to_graph
from metapt.domains.molecules.featurize import SELF_LOOP_BOND_TYPE
from metapt.domains.molecules.models import GINConvHu, GINEncoder, MoleculeClassifier, MultitaskHead, masked_bce

SMILES = ["CCO", "c1ccccc1", "C", "F/C=C/C#N", "C[C@H](N)O", "CC(=O)Nc1ccc(O)cc1"]


@pytest.fixture
def batch():
    return Batch.from_data_list([smiles_to_graph(s) for s in SMILES])


def test_shapes_and_presets(batch):
    torch.manual_seed(0)
    enc = GINEncoder()
    assert (enc.num_layers, enc.emb_dim) == (3, 64)
    assert enc(batch).shape == (len(SMILES), 64)
    assert MultitaskHead(64, 30)(enc(batch)).shape == (len(SMILES), 30)
    assert MoleculeClassifier(enc, 7)(batch).shape == (len(SMILES), 7)
    assert enc(smiles_to_graph("CCO")).shape == (1, 64)  # a lone Data (no .batch)
    hu = GINEncoder.hu2020()
    assert (hu.num_layers, hu.emb_dim, hu.dropout, hu.norm) == (5, 300, 0.2, "batch")
    assert hu(batch).shape == (len(SMILES), 300)
    assert GINEncoder.from_preset("small", norm="none").norm == "none"
    for bad in [dict(norm="group"), dict(num_layers=0), dict(dropout=1.0)]:
        with pytest.raises(ValueError):
            GINEncoder(**bad)
    with pytest.raises(ValueError, match="preset"):
        GINEncoder.from_preset("huge")
    with pytest.raises(ValueError, match="long"):
        enc.node_embeddings(batch.x.float(), batch.edge_index, batch.edge_attr)


def test_layer_adds_a_typed_self_loop():
    torch.manual_seed(0)
    conv = GINConvHu(8)
    h = torch.randn(1, 8)
    empty = smiles_to_graph("C")
    expected = conv.mlp(h + conv.bond_type_embedding.weight[SELF_LOOP_BOND_TYPE] + conv.bond_dir_embedding.weight[0])
    torch.testing.assert_close(conv(h, empty.edge_index, empty.edge_attr), expected)
    two = smiles_to_graph("CC")
    h2 = torch.randn(2, 8)
    bond = conv.bond_type_embedding.weight[0] + conv.bond_dir_embedding.weight[0]
    loop = conv.bond_type_embedding.weight[SELF_LOOP_BOND_TYPE] + conv.bond_dir_embedding.weight[0]
    expected0 = conv.mlp(h2[0] + loop + h2[1] + bond)
    torch.testing.assert_close(conv(h2, two.edge_index, two.edge_attr)[0], expected0)


def test_no_relu_after_the_last_layer(batch):
    torch.manual_seed(0)
    enc = GINEncoder(num_layers=2, emb_dim=16, dropout=0.0, norm="none")
    h = enc.node_embeddings(batch.x, batch.edge_index, batch.edge_attr)
    assert (h < 0).any() and (h > 0).any()  # Hu et al.: JK = last takes the pre-ReLU output


def _permute(data, perm):
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm))
    out = data.clone()
    out.x = data.x[perm]
    out.edge_index = inverse[data.edge_index]
    return out


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_node_order_does_not_matter(norm):
    torch.manual_seed(0)
    enc = GINEncoder(num_layers=3, emb_dim=32, norm=norm).eval()
    graphs = [smiles_to_graph(s) for s in SMILES]
    perms = [torch.randperm(g.num_nodes) for g in graphs]
    a = enc(Batch.from_data_list(graphs))
    b = enc(Batch.from_data_list([_permute(g, p) for g, p in zip(graphs, perms)]))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not torch.allclose(a[0], a[4])  # and the embeddings are not trivially equal


def test_functional_call_matches_the_module(batch):
    torch.manual_seed(0)
    model = MoleculeClassifier(GINEncoder(dropout=0.0), 4).eval()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    torch.testing.assert_close(functional_call(model, params, (batch,)), model(batch), rtol=0, atol=0)
    shifted = {k: v + 0.01 * torch.randn_like(v) for k, v in params.items()}
    out = functional_call(model.encoder, {k.removeprefix("encoder."): v for k, v in shifted.items()
                                          if k.startswith("encoder.")}, (batch,))  # fmt: skip
    model.load_state_dict(shifted, strict=False)
    torch.testing.assert_close(out, model.encoder(batch), rtol=0, atol=0)
    assert not torch.allclose(out, MoleculeClassifier(GINEncoder(dropout=0.0), 4).eval().encoder(batch))


@pytest.mark.parametrize("norm", ["none", "batch-eval", "batch-train", "layer"])
def test_hessian_vector_product_matches_finite_differences(batch, norm):
    torch.manual_seed(0)
    enc = GINEncoder(num_layers=2, emb_dim=8, dropout=0.0, norm=norm.split("-")[0])
    model = MoleculeClassifier(enc, 3).double().train(norm != "batch-eval")
    labels = torch.randint(0, 2, (len(SMILES), 3)).double()
    labels[torch.rand(labels.shape) < 0.3] = float("nan")
    task_w, example_w = torch.rand(3, dtype=torch.float64) + 0.5, torch.rand(len(SMILES), dtype=torch.float64) + 0.5
    names = [k for k, _ in model.named_parameters()]
    theta = [p.detach().clone() for _, p in model.named_parameters()]

    def grad_at(values, create_graph=False):
        values = [v.requires_grad_(True) if not v.requires_grad else v for v in values]
        logits = functional_call(model, dict(zip(names, values)), (batch,))
        loss = masked_bce(logits, labels, task_w, example_w)
        return torch.autograd.grad(loss, values, create_graph=create_graph)

    params = [t.clone().requires_grad_(True) for t in theta]
    grads = grad_at(params, create_graph=True)
    direction = [torch.randn_like(t) for t in theta]
    hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, direction)), params)
    eps = 1e-6
    plus = grad_at([(t + eps * v).detach() for t, v in zip(theta, direction)])
    minus = grad_at([(t - eps * v).detach() for t, v in zip(theta, direction)])
    fd = torch.cat([((p - m) / (2 * eps)).flatten() for p, m in zip(plus, minus)])
    hvp = torch.cat([h.flatten() for h in hvp])
    assert torch.isfinite(hvp).all() and hvp.abs().max() > 1e-3
    torch.testing.assert_close(hvp, fd, rtol=1e-5, atol=1e-7)


def _naive_masked_bce(logits, labels, task_w, example_w):
    total, count = 0.0, 0
    for i in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            y = labels[i, t]
            if torch.isnan(y):
                continue
            p = torch.sigmoid(logits[i, t])
            total = total - example_w[i] * task_w[t] * (y * torch.log(p) + (1 - y) * torch.log(1 - p))
            count += 1
    return total / count


def test_masked_bce_matches_a_naive_loop():
    torch.manual_seed(0)
    logits = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 2, (7, 4)).double()
    labels[torch.rand(7, 4) < 0.4] = float("nan")
    task_w = (torch.rand(4, dtype=torch.float64) * 2).requires_grad_(True)
    example_w = (torch.rand(7, dtype=torch.float64) * 2).requires_grad_(True)
    ours = masked_bce(logits, labels, task_w, example_w)
    naive = _naive_masked_bce(logits, labels, task_w, example_w)
    torch.testing.assert_close(ours, naive)
    g_ours = torch.autograd.grad(ours, (logits, task_w, example_w))
    g_naive = torch.autograd.grad(naive, (logits, task_w, example_w))
    for a, b in zip(g_ours, g_naive):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    assert g_ours[1].abs().sum() > 0 and g_ours[2].abs().sum() > 0
    ones = masked_bce(logits, labels)  # unweighted = mean over observed labels
    observed = ~labels.isnan()
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits[observed], labels[observed])
    torch.testing.assert_close(ones, plain)


def test_masked_bce_edge_cases():
    logits = torch.randn(3, 2, requires_grad=True)
    nothing = masked_bce(logits, torch.full((3, 2), float("nan")))
    assert nothing.item() == 0.0
    (grad,) = torch.autograd.grad(nothing, logits)
    assert torch.equal(grad, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="labels shape"):
        masked_bce(logits, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="task_weights"):
        masked_bce(logits, torch.zeros(3, 2), task_weights=torch.ones(3))
    with pytest.raises(ValueError, match="example_weights"):
        masked_bce(logits, torch.zeros(3, 2), example_weights=torch.ones(2))
    with pytest.raises(ValueError, match="view"):
        masked_bce(torch.zeros(3), torch.zeros(3))
