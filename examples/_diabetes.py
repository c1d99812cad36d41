"""Shared by the federated examples: the diabetes data, a central baseline, and the plot.

scikit-learn ships the data set (442 patients, 10 features, a disease progression score), so
nothing is downloaded. Features and target are standardised; 20% of the patients are held out.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn, optim


def load(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` as float32 tensors, standardised on the train part."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.float32).unsqueeze(1)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    train, test = order[:cut], order[cut:]
    mx, sx = x[train].mean(0), x[train].std(0)
    my, sy = y[train].mean(0), y[train].std(0)
    return (x[train] - mx) / sx, (y[train] - my) / sy, (x[test] - mx) / sx, (y[test] - my) / sy


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(10, 1)


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return ((model(x) - y) ** 2).mean().item()


def train_central(x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> tuple[nn.Module, list[float]]:
    """The baseline: the same model trained on all the training data in one place."""
    model = make_model()
    opt = optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def plot(curves: dict[str, list[float]], title: str, path: Path) -> Path:
    """Save the loss curves as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("training loss (MSE, standardised)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
