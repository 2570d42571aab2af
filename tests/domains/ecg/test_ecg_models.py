"""The 1-D ResNet encoder: shapes, configs, functional_call and double backward."""

import pytest
import torch
from torch.func import functional_call

from metapt.domains.ecg.models import (
    ClassifierHead,
    EncoderConfig,
    ProjectionHead,
    ResNet1dEncoder,
    count_parameters,
)


@pytest.mark.parametrize("length", [256, 250, 1000, 9])
@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_embedding_shape_for_any_length(length, norm):
    enc = ResNet1dEncoder(EncoderConfig(in_channels=2, norm=norm))
    out = enc(torch.randn(3, 2, length))
    assert out.shape == (3, 64) and enc.embedding_dim == 64
    assert torch.isfinite(out).all()


def test_paper_config_is_resnet18_like_and_default_is_small():
    paper = EncoderConfig.paper()
    assert (paper.widths, paper.blocks, paper.kernel_size, paper.in_channels) == (
        (64, 128, 256, 512), (2, 2, 2, 2), 15, 12)
    small = ResNet1dEncoder()
    big = ResNet1dEncoder(paper)
    n_blocks = sum(1 for m in big.modules() if type(m).__name__ == "BasicBlock1d")
    assert n_blocks == 8
    assert count_parameters(small) < 300_000 < 10_000_000 < count_parameters(big)
    assert big(torch.randn(2, 12, 64)).shape == (2, 512)


def test_four_stride2_stages_downsample_16x():
    enc = ResNet1dEncoder()
    feats = enc.stages(enc.stem(torch.randn(2, 1, 256)))
    assert feats.shape == (2, 64, 16)


def test_heads():
    h = torch.randn(5, 64)
    assert ClassifierHead(64, 5)(h).shape == (5, 5)
    assert ProjectionHead(64, out_dim=32)(h).shape == (5, 32)


def test_bad_config_and_input_rejected():
    with pytest.raises(ValueError, match="odd"):
        EncoderConfig(kernel_size=14)
    with pytest.raises(ValueError, match="same length"):
        EncoderConfig(widths=(8, 8), blocks=(1,))
    with pytest.raises(ValueError, match="norm"):
        EncoderConfig(norm="layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="in_channels"):
        ResNet1dEncoder()(torch.randn(2, 12, 64))


def test_functional_call_uses_the_given_parameters():
    torch.manual_seed(0)
    enc = ResNet1dEncoder(EncoderConfig(widths=(4, 8, 8, 8)))
    x = torch.randn(4, 1, 64)
    params = {k: v.detach().clone() for k, v in enc.named_parameters()}
    torch.testing.assert_close(functional_call(enc, params, (x,)), enc(x))
    params["stem.0.weight"] = params["stem.0.weight"] * 2
    assert not torch.allclose(functional_call(enc, params, (x,)), enc(x))


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_hessian_vector_product_matches_finite_differences(norm):
    """Double backward: autograd's H v equals (grad(theta + eps v) - grad(theta - eps v)) / 2eps."""
    torch.manual_seed(0)
    enc = ResNet1dEncoder(EncoderConfig(widths=(3, 4, 4, 4), kernel_size=5, norm=norm)).double()
    head = ClassifierHead(4, 1).double()
    x = torch.randn(6, 1, 40, dtype=torch.float64)
    y = torch.tensor([0.0, 1, 0, 1, 1, 0], dtype=torch.float64)[:, None]
    names = [k for k, _ in enc.named_parameters()]
    theta = [p.detach().clone().requires_grad_() for _, p in enc.named_parameters()]
    v = [torch.randn_like(p) for p in theta]

    def grads(ps, create_graph):
        emb = functional_call(enc, dict(zip(names, ps)), (x,))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(emb), y)
        return torch.autograd.grad(loss, ps, create_graph=create_graph)

    g = grads(theta, True)
    hv = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), theta)
    eps = 1e-5
    gp = grads([(p + eps * d).detach().requires_grad_() for p, d in zip(theta, v)], False)
    gm = grads([(p - eps * d).detach().requires_grad_() for p, d in zip(theta, v)], False)
    fd = torch.cat([((a - b) / (2 * eps)).flatten() for a, b in zip(gp, gm)])
    auto = torch.cat([h.flatten() for h in hv])
    assert auto.abs().max() > 1e-3  # the check is not vacuous
    torch.testing.assert_close(auto, fd, rtol=1e-4, atol=1e-6)
