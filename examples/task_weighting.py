"""Meta-learn task weights for your own multitask pre-training, in plain PyTorch.

Your model: an encoder with one output per pre-training task. Your data: three binary
pre-training tasks on the same inputs, the third a coin flip, and a small labelled
downstream task. metapt learns one weight per pre-training task (w = 2·sigmoid(logit), all 1
at the start) so that the encoder, once fine-tuned, does well downstream. The coin-flip task
ends with the lowest weight.

Run: python examples/task_weighting.py
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset, default_collate

import metapt

torch.manual_seed(0)

# Your data: three pre-training tasks on inputs x (the third is a coin flip) and a downstream
# task that depends on what the first two see.
dim = 16
directions = torch.randn(dim, 2)
x = torch.randn(2048, dim)
coin_flips = torch.randint(0, 2, (len(x), 1)).float()
pretrain_data = TensorDataset(x, torch.cat([(x @ directions > 0).float(), coin_flips], dim=1))


def downstream_data(n):
    x = torch.randn(n, dim)
    return TensorDataset(x, (x @ directions.sum(1) > 0).float())


finetune_data, metaval_data = downstream_data(256), downstream_data(256)


# Your model: features and one logit per pre-training task; a separate downstream head.
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, 8))
        self.task_heads = nn.Linear(8, 3)

    def forward(self, x):
        features = self.encoder(x)
        return features, self.task_heads(features)


net, finetune_head = Net(), nn.Linear(8, 1)
tasks = metapt.TaskWeights(3, names=["a", "b", "coin"])  # φ = {"task_logits": [3]}, w = 2·sigmoid(φ)


class TaskWeighting(metapt.MetaProblem):
    """Losses take θ, φ and ψ as dicts of tensors; batches are addressed by index."""

    def __init__(self, batch_size=64):
        self.pretrain_order = metapt.EpochShuffler(len(pretrain_data), batch_size, seed=0)
        self.finetune_order = metapt.EpochShuffler(len(finetune_data), batch_size, seed=1)
        self.metaval_order = metapt.EpochShuffler(len(metaval_data), batch_size, seed=2)

    def pretrain_loss(self, params, metaparams, batch):
        x, y = batch
        _, logits = functional_call(net, params, (x,))
        per_task = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(0)  # [3]
        return (tasks.weights(metaparams) * per_task).mean()

    def finetune_loss(self, params, head, batch):
        x, y = batch
        features, _ = functional_call(net, params, (x,))
        logit = functional_call(finetune_head, head, (features,)).squeeze(1)
        return F.binary_cross_entropy_with_logits(logit, y)

    def pretrain_batch(self, index):  # the same index gives the same batch, every time
        return default_collate([pretrain_data[i] for i in self.pretrain_order.indices(index)])

    def finetune_batch(self, index):
        return default_collate([finetune_data[i] for i in self.finetune_order.indices(index)])

    def metaval_batch(self, index):
        return default_collate([metaval_data[i] for i in self.metaval_order.indices(index)])

    def describe_metaparams(self, metaparams):  # logged after each meta-step as phi/...
        return tasks.summary(metaparams)


trainer = metapt.MetaPretrainer(
    TaskWeighting(),
    params=dict(net.named_parameters()),  # θ: copied; the trainer owns its copy
    head=dict(finetune_head.named_parameters()),  # ψ
    metaparams=tasks.init(),  # φ: every weight 1 at the start
    pt_optimizer=lambda θ: torch.optim.Adam(θ, lr=1e-2),
    meta_optimizer=lambda φ: torch.optim.Adam(φ, lr=0.05),
    schedule=metapt.MetaSchedule(interval=5),
)
trainer.run_until(600)  # pre-train until step 600, with a meta-step every 5 steps

result = trainer.snapshot()  # detached copies of θ, ψ, φ and the counters
weights = tasks.weights(result.metaparams)
print("task weights:", {name: round(w, 3) for name, w in zip(tasks.names, weights.tolist())})
print(f"{result.meta_step_count} meta-steps, {result.skipped} skipped")
net.load_state_dict(result.params)  # your model, pre-trained with the learned task weights
