"""The FLUIDS server: FedAvg over the clients' autoencoders, then a head.

After every round the server trains a small classifier head on the encoder's
features of its own labelled set (about 1% of the data) and scores the global
test set: AUROC, F1 and accuracy.  The strategy is Flower's own ``FedAvg``,
unmodified; which clients train is decided by whatever ``Grid`` it runs on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fl_app import data, model

log = logging.getLogger("fl_app.server")


@dataclass(frozen=True)
class TrainingConfig:
    """How the clients train and how long the run lasts."""

    num_rounds: int = 10
    local_steps: int = 100
    batch_size: int = 64
    learning_rate: float = 3e-3
    seed: int = 0


EvaluateHook = Callable[[int, dict[str, float]], None]


def make_strategy() -> FedAvg:
    """FedAvg that trains every slot the grid offers and evaluates on the server."""
    return FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_evaluate_nodes=0,
        min_available_nodes=1,
    )


def run(
    grid: Grid,
    fed: data.FederatedData,
    config: TrainingConfig,
    on_evaluate: EvaluateHook = lambda server_round, metrics: None,
) -> ArrayRecord:
    """Run ``config.num_rounds`` rounds over ``grid``; return the final weights."""
    torch.set_num_threads(1)
    initial = model.build_autoencoder(fed.input_dim, seed=config.seed)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        autoencoder = model.build_autoencoder(fed.input_dim)
        autoencoder.load_state_dict(arrays.to_torch_state_dict())
        metrics = model.train_head_and_evaluate(
            autoencoder,
            fed.server_x,
            fed.server_y,
            fed.test_x,
            fed.test_y,
            seed=config.seed,
        )
        on_evaluate(server_round, metrics)
        return MetricRecord(metrics)

    result = make_strategy().start(
        grid=grid,
        initial_arrays=ArrayRecord(initial.state_dict()),
        num_rounds=config.num_rounds,
        train_config=ConfigRecord(
            {
                "local-steps": config.local_steps,
                "batch-size": config.batch_size,
                "lr": config.learning_rate,
            }
        ),
        evaluate_fn=evaluate,
    )
    return result.arrays


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for Flower's own runtimes: data and settings from the run config."""
    settings = context.run_config
    fed = data.prepare_federated(
        str(settings.get("dataset", "ton_iot")),
        int(settings.get("num-clients", 20)),
        seed=int(settings.get("seed", 0)),
    )
    run(
        grid,
        fed,
        TrainingConfig(
            num_rounds=int(settings.get("num-rounds", 10)),
            local_steps=int(settings.get("local-steps", 100)),
            batch_size=int(settings.get("batch-size", 64)),
            learning_rate=float(settings.get("lr", 3e-3)),
            seed=int(settings.get("seed", 0)),
        ),
    )
