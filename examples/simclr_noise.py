"""Meta-learn the augmentation of your own SimCLR-style pre-training: a noise model.

SimCLR pre-trains an encoder to recognise two augmented views of the same example among
the views of other examples (NT-Xent loss). Which augmentation? Here the views add Gaussian
noise with one learned standard deviation per input feature: φ is the noise model
(:class:`metapt.GaussianNoiseScales`). Two of the eight features carry the downstream label;
the other six are nuisance features with a larger spread, which an encoder with a
two-dimensional bottleneck would rather keep. metapt moves the noise down on the two
informative features and up on the nuisance ones, so the encoder learns to ignore them.
(A toy, and a noisy one: with seeds 0 to 3 of ``torch.manual_seed`` the two informative
features end with the lowest noise in three runs; in the fourth, one informative and one
nuisance feature swap places.)

The noise ε is drawn when a batch is made, from a generator seeded by the batch index, and
travels in the batch: the noisy view x + σ(φ) ⊙ ε is then a differentiable function of φ
(the reparameterisation trick), and batch i is the same every time it is asked for.

Run: python examples/simclr_noise.py
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import metapt

torch.manual_seed(0)

# Your data: unlabelled inputs for pre-training; a small labelled downstream task.
dim = 8
informative = torch.arange(dim) < 2
spread = torch.where(informative, 1.0, 1.5)  # the nuisance features vary more
unlabelled = torch.randn(512, dim) * spread


def labelled(n):
    x = torch.randn(n, dim) * spread
    return x, x[:, 0] - x[:, 1]


finetune_data, metaval_data = labelled(512), labelled(512)


# Your model: encoder with a 2-d output, SimCLR projection head, downstream linear head.
class SimCLRNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(dim, 2)
        self.projector = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16))

    def forward(self, x):
        features = self.encoder(x)
        return features, self.projector(features)


net, finetune_head = SimCLRNet(), nn.Linear(2, 1)
noise = metapt.GaussianNoiseScales(dim, init_std=1.0, max_std=3.0)  # σ = 3·sigmoid(φ), 1 at the start


def nt_xent(z1, z2, temperature=0.5):
    """SimCLR's loss: each of the 2N views must pick out its partner among the other 2N − 1."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    similarity = (z @ z.T / temperature).masked_fill(torch.eye(len(z), dtype=torch.bool), float("-inf"))
    n = len(z1)
    return F.cross_entropy(similarity, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))


class SimCLRNoise(metapt.MetaProblem):
    def __init__(self, batch_size=64):
        self.order = metapt.EpochShuffler(len(unlabelled), batch_size, seed=0)

    def pretrain_batch(self, index):  # inputs and the noise of both views, seeded by the index
        x = unlabelled[self.order.indices(index)]
        eps = torch.randn(2, *x.shape, generator=torch.Generator().manual_seed(index))
        return x, eps

    def pretrain_loss(self, params, metaparams, batch):
        x, eps = batch
        views = x + noise.noise(metaparams, eps)  # [2, B, dim], differentiable in φ
        _, z = functional_call(net, params, (views,))
        return nt_xent(z[0], z[1])

    def finetune_loss(self, params, head, batch):
        x, y = batch
        features, _ = functional_call(net, params, (x,))
        return (functional_call(finetune_head, head, (features,)).squeeze(1) - y).pow(2).mean()

    def finetune_batch(self, index):
        return _sample(finetune_data, index)

    def metaval_batch(self, index):
        return _sample(metaval_data, index)

    def describe_metaparams(self, metaparams):
        return noise.summary(metaparams)


def _sample(data, index, size=128):
    rows = torch.randperm(len(data[0]), generator=torch.Generator().manual_seed(index))[:size]
    return data[0][rows], data[1][rows]


trainer = metapt.MetaPretrainer(
    SimCLRNoise(),
    params=dict(net.named_parameters()),
    head=dict(finetune_head.named_parameters()),
    metaparams=noise.init(),
    pt_optimizer=lambda θ: torch.optim.Adam(θ, lr=1e-2),
    meta_optimizer=lambda φ: torch.optim.Adam(φ, lr=0.05),
    inner_optimizer=metapt.sgd(0.05),  # the unrolled fine-tuning step of the head
    schedule=metapt.MetaSchedule(interval=5, head_steps=5),
)
trainer.run_until(600)

std = noise.std(trainer.snapshot().metaparams)
print("noise std, informative features:", [round(s, 2) for s in std[informative].tolist()])
print("noise std, nuisance features:   ", [round(s, 2) for s in std[~informative].tolist()])
