"""The FLUIDS autoencoder, its local training, and the server's classifier head.

Clients train the autoencoder on unlabelled traffic; the server averages the
weights, then fits a small head on the frozen 16-dimensional encoder features
with its labelled set and reports AUROC, F1 and accuracy on the test set.

Threads: these functions use torch's global thread pool. Many client processes
share two cores, so a client process should call ``torch.set_num_threads(1)``
once at start-up; the functions here do not change it behind the caller's back.
Every function that draws random numbers takes a seed and leaves torch's
global generator untouched, so results are reproducible.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from sklearn import metrics
from torch import nn

HIDDEN_DIM = 64
CODE_DIM = 16
HEAD_HIDDEN_DIM = 16
HEAD_STEPS = 300
HEAD_LR = 1e-2
DECISION_THRESHOLD = 0.5


class Autoencoder(nn.Module):
    """input_dim -> 64 -> 16 encoder and its mirror, ReLU, sigmoid output."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(input_dim, HIDDEN_DIM),
            nn.ReLU(),
            nn.Linear(HIDDEN_DIM, CODE_DIM),
            nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.Linear(CODE_DIM, HIDDEN_DIM),
            nn.ReLU(),
            nn.Linear(HIDDEN_DIM, input_dim),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``x``."""
        return self.decoder(self.encoder(x))


def build_autoencoder(input_dim: int, *, seed: int = 0) -> Autoencoder:
    """Return an autoencoder for ``input_dim`` features, initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Autoencoder(input_dim)


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """Return copies of the model's tensors in ``state_dict`` order."""
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]


def set_weights(model: nn.Module, arrays: Sequence[np.ndarray]) -> None:
    """Load tensors given in ``state_dict`` order; shapes must match."""
    keys = list(model.state_dict())
    if len(arrays) != len(keys):
        raise ValueError(f"expected {len(keys)} arrays, got {len(arrays)}")
    state = {
        key: torch.as_tensor(np.asarray(a)) for key, a in zip(keys, arrays, strict=True)
    }
    model.load_state_dict(state, strict=True)


def train_autoencoder(
    model: Autoencoder,
    x: np.ndarray,
    *,
    local_steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> float:
    """Train on ``x`` for ``local_steps`` Adam steps; return the mean batch MSE.

    Batches come from a seeded shuffle of the rows, reshuffled each time the
    data is exhausted, so every row is seen once per pass.
    """
    if len(x) == 0:
        raise ValueError("cannot train on an empty feature matrix")
    data = torch.as_tensor(np.asarray(x, dtype=np.float32))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.MSELoss()
    model.train()
    losses = []
    for rows in _batches(len(data), batch_size, local_steps, generator):
        batch = data[rows]
        optimizer.zero_grad()
        loss = loss_fn(model(batch), batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def reconstruction_mse(model: Autoencoder, x: np.ndarray) -> float:
    """Return the mean squared reconstruction error of ``model`` on ``x``."""
    model.eval()
    with torch.no_grad():
        data = torch.as_tensor(np.asarray(x, dtype=np.float32))
        return float(nn.functional.mse_loss(model(data), data))


def encode(model: Autoencoder, x: np.ndarray) -> np.ndarray:
    """Return the 16-dimensional encoder features of ``x``."""
    model.eval()
    with torch.no_grad():
        return model.encoder(torch.as_tensor(np.asarray(x, dtype=np.float32))).numpy()


def train_head_and_evaluate(
    autoencoder: Autoencoder,
    server_x: np.ndarray,
    server_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    seed: int,
) -> dict[str, float]:
    """Fit a head on frozen encoder features of the server set; score the test set.

    The head is a 16-16-1 MLP trained full-batch with Adam on the raw encoder
    features. They are not standardised on purpose: standardising lets even an
    untrained encoder score high, which would hide what federated training
    adds. Returns ``auroc`` (from the
    attack probability), and ``f1`` and ``accuracy`` at threshold 0.5.
    """
    head = _fit_head(encode(autoencoder, server_x), np.asarray(server_y), seed)
    with torch.no_grad():
        logits = head(torch.as_tensor(encode(autoencoder, test_x))).squeeze(1)
        probability = torch.sigmoid(logits).numpy()
    return _scores(np.asarray(test_y), probability)


def _fit_head(codes: np.ndarray, labels: np.ndarray, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Sequential(
            nn.Linear(CODE_DIM, HEAD_HIDDEN_DIM),
            nn.ReLU(),
            nn.Linear(HEAD_HIDDEN_DIM, 1),
        )
    inputs = torch.as_tensor(codes, dtype=torch.float32)
    targets = torch.as_tensor(labels, dtype=torch.float32)
    optimizer = torch.optim.Adam(head.parameters(), lr=HEAD_LR)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(HEAD_STEPS):
        optimizer.zero_grad()
        loss_fn(head(inputs).squeeze(1), targets).backward()
        optimizer.step()
    return head.eval()


def _scores(labels: np.ndarray, probability: np.ndarray) -> dict[str, float]:
    predicted = (probability >= DECISION_THRESHOLD).astype(np.int64)
    both_classes = len(np.unique(labels)) == 2
    return {
        "auroc": (
            float(metrics.roc_auc_score(labels, probability))
            if both_classes
            else float("nan")
        ),
        "f1": float(metrics.f1_score(labels, predicted, zero_division=0)),
        "accuracy": float(metrics.accuracy_score(labels, predicted)),
    }


def _batches(
    num_rows: int, batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    order = torch.randperm(num_rows, generator=generator)
    cursor = 0
    for _ in range(steps):
        if cursor >= num_rows:
            order, cursor = torch.randperm(num_rows, generator=generator), 0
        yield order[cursor : cursor + batch_size]
        cursor += batch_size
