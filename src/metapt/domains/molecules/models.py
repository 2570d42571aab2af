"""GIN with edge features (Hu et al., ICLR 2020), a multitask head, and the masked BCE loss.

The encoder follows ``chem/model.py`` of "Strategies for Pre-training Graph Neural Networks":
atom-type + chirality embeddings summed into the input node embedding; each layer is a GIN
convolution whose messages add that layer's bond-type + bond-direction embedding, over the
bonds plus a self loop per atom (bond type :data:`SELF_LOOP_BOND_TYPE`), followed by an MLP
(emb -> 2 emb -> emb), a norm, ReLU (not after the last layer) and dropout; JK = last; mean
pooling. Everything is plain differentiable tensor code, so it runs under
``torch.func.functional_call`` and supports double backward (Hessian-vector products) as the
hypergradient engine needs.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Data
from torch_geometric.nn import MessagePassing, global_mean_pool

from metapt.losses import masked_bce  # re-exported: the molecules PT loss

from metapt.domains.molecules.featurize import (
    NUM_ATOM_TYPES,
    NUM_BOND_DIRECTIONS,
    NUM_BOND_TYPES,
    NUM_CHIRALITY_TAGS,
    SELF_LOOP_BOND_TYPE,
)

__all__ = ["GIN_PRESETS", "GINConvHu", "GINEncoder", "MultitaskHead", "MoleculeClassifier", "masked_bce"]

Norm = Literal["batch", "layer", "none"]

#: ``"hu2020"``: Hu et al.'s encoder (5 layers, 300 dims, batch norm, dropout 0.2 as in their
#: supervised pre-training script ``pretrain_supervised.py``; their fine-tuning script uses 0.5).
#: ``"small"``: the CPU default, sized so the main job fits 2 CPU cores.
GIN_PRESETS: dict[str, dict[str, Any]] = {
    "hu2020": {"num_layers": 5, "emb_dim": 300, "dropout": 0.2, "norm": "batch"},
    "small": {"num_layers": 3, "emb_dim": 64, "dropout": 0.2, "norm": "batch"},
}


class GINConvHu(MessagePassing):
    r"""GIN layer with bond embeddings (Hu et al. 2020).

    .. math::
        h_v' = \mathrm{MLP}\Big(\sum_{u \in \mathcal{N}(v) \cup \{v\}} h_u + e_{uv}\Big),
        \qquad e_{uv} = E_\text{type}[t_{uv}] + E_\text{dir}[d_{uv}]

    PyG's ``GINEConv`` differs (ReLU on messages, :math:`(1+\epsilon) h_v` instead of a typed
    self loop), hence this subclass.
    """

    def __init__(self, emb_dim: int) -> None:
        super().__init__(aggr="add")
        self.mlp = nn.Sequential(nn.Linear(emb_dim, 2 * emb_dim), nn.ReLU(), nn.Linear(2 * emb_dim, emb_dim))
        self.bond_type_embedding = nn.Embedding(NUM_BOND_TYPES, emb_dim)
        self.bond_dir_embedding = nn.Embedding(NUM_BOND_DIRECTIONS, emb_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        nn.init.xavier_uniform_(self.bond_type_embedding.weight)
        nn.init.xavier_uniform_(self.bond_dir_embedding.weight)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        num_nodes = x.size(0)
        loop = torch.arange(num_nodes, device=edge_index.device)
        edge_index = torch.cat([edge_index, torch.stack([loop, loop])], dim=1)
        loop_attr = torch.zeros(num_nodes, 2, dtype=edge_attr.dtype, device=edge_attr.device)
        loop_attr[:, 0] = SELF_LOOP_BOND_TYPE
        edge_attr = torch.cat([edge_attr, loop_attr], dim=0)
        edge_emb = self.bond_type_embedding(edge_attr[:, 0]) + self.bond_dir_embedding(edge_attr[:, 1])
        return self.mlp(self.propagate(edge_index, x=x, edge_emb=edge_emb))

    def message(self, x_j: Tensor, edge_emb: Tensor) -> Tensor:
        return x_j + edge_emb


def _make_norm(norm: str, emb_dim: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm1d(emb_dim)
    if norm == "layer":
        return nn.LayerNorm(emb_dim)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch' (Hu et al.), 'layer' or 'none', got {norm!r}")


class GINEncoder(nn.Module):
    """Molecule graph -> ``[num_graphs, emb_dim]`` embedding (GIN of Hu et al., JK = last, mean pool).

    Args:
        num_layers: message-passing layers (Hu et al.: 5).
        emb_dim: node embedding width (Hu et al.: 300).
        dropout: dropout after every layer (Hu et al.: 0.2 pre-training, 0.5 fine-tuning).
        norm: ``"batch"`` (Hu et al.), ``"layer"`` or ``"none"``. Batch norm couples the
            examples of a batch and keeps running statistics; ``"none"`` or ``"layer"`` make
            each graph's embedding depend on that graph alone.
    """

    def __init__(self, num_layers: int = 3, emb_dim: int = 64, dropout: float = 0.2, norm: Norm = "batch") -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_layers, self.emb_dim, self.dropout, self.norm = num_layers, emb_dim, dropout, norm
        self.atom_type_embedding = nn.Embedding(NUM_ATOM_TYPES, emb_dim)
        self.chirality_embedding = nn.Embedding(NUM_CHIRALITY_TAGS, emb_dim)
        self.convs = nn.ModuleList(GINConvHu(emb_dim) for _ in range(num_layers))
        self.norms = nn.ModuleList(_make_norm(norm, emb_dim) for _ in range(num_layers))
        self.reset_parameters()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GINEncoder:
        """Build a preset from :data:`GIN_PRESETS` (``"hu2020"`` or ``"small"``), with overrides."""
        if name not in GIN_PRESETS:
            raise ValueError(f"unknown GIN preset {name!r}; choose one of {sorted(GIN_PRESETS)}")
        return cls(**{**GIN_PRESETS[name], **overrides})

    @classmethod
    def hu2020(cls, **overrides: Any) -> GINEncoder:
        """Hu et al.'s configuration: 5 layers, 300 dims, batch norm, dropout 0.2."""
        return cls.from_preset("hu2020", **overrides)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.atom_type_embedding.weight)
        nn.init.xavier_uniform_(self.chirality_embedding.weight)
        for conv, norm in zip(self.convs, self.norms):
            conv.reset_parameters()
            if hasattr(norm, "reset_parameters"):
                norm.reset_parameters()

    def node_embeddings(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        """``[num_nodes, emb_dim]`` node embeddings of the last layer."""
        if x.dim() != 2 or x.size(1) != 2 or x.dtype != torch.long:
            raise ValueError(
                f"x must be long[num_nodes, 2] (atom type, chirality) from metapt.domains.molecules.featurize, "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        if edge_attr.dim() != 2 or edge_attr.size(1) != 2:
            raise ValueError(
                f"edge_attr must be long[num_edges, 2] (bond type, bond direction), got {tuple(edge_attr.shape)}"
            )
        h = self.atom_type_embedding(x[:, 0]) + self.chirality_embedding(x[:, 1])
        for layer, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = norm(conv(h, edge_index, edge_attr))
            if layer < self.num_layers - 1:
                h = F.relu(h)
            h = F.dropout(h, p=self.dropout, training=self.training)
        return h

    def forward(self, data: Data) -> Tensor:
        """Embed a PyG ``Batch`` (or a single ``Data``) to ``[num_graphs, emb_dim]``."""
        h = self.node_embeddings(data.x, data.edge_index, data.edge_attr)
        batch = getattr(data, "batch", None)
        if batch is None:
            return h.mean(dim=0, keepdim=True)
        return global_mean_pool(h, batch, size=data.num_graphs)

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, emb_dim={self.emb_dim}, dropout={self.dropout}, norm={self.norm!r}"


class MultitaskHead(nn.Linear):
    """Linear map from graph embeddings ``[B, emb_dim]`` to task logits ``[B, num_tasks]``."""

    def __init__(self, emb_dim: int, num_tasks: int) -> None:
        super().__init__(emb_dim, num_tasks)


class MoleculeClassifier(nn.Module):
    """Encoder + head, i.e. Hu et al.'s ``GNN_graphpred``: PyG batch -> ``[B, num_tasks]`` logits."""

    def __init__(self, encoder: GINEncoder, num_tasks: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = MultitaskHead(encoder.emb_dim, num_tasks)

    def forward(self, data: Data) -> Tensor:
        return self.head(self.encoder(data))
