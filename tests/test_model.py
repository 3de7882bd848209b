"""The FLUIDS autoencoder, its weights, local training and the server's head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_app import model

INPUT_DIM = 12


def blobs(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two well separated clusters in [0, 1]^INPUT_DIM, labelled 0 and 1."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, rows)
    centres = np.where(y[:, None] == 1, 0.8, 0.2)
    x = np.clip(centres + rng.normal(0, 0.05, (rows, INPUT_DIM)), 0, 1)
    return x.astype(np.float32), y


def test_the_autoencoder_has_a_64_16_encoder_and_a_mirrored_decoder() -> None:
    shapes = [w.shape for w in model.get_weights(model.build_autoencoder(INPUT_DIM))]

    assert shapes == [
        (64, INPUT_DIM),
        (64,),
        (16, 64),
        (16,),
        (64, 16),
        (64,),
        (INPUT_DIM, 64),
        (INPUT_DIM,),
    ]


def test_weights_round_trip_between_models() -> None:
    source = model.build_autoencoder(INPUT_DIM, seed=1)
    target = model.build_autoencoder(INPUT_DIM, seed=2)
    x = torch.rand(5, INPUT_DIM)

    model.set_weights(target, model.get_weights(source))

    assert torch.equal(source(x), target(x))


def test_get_weights_returns_copies() -> None:
    autoencoder = model.build_autoencoder(INPUT_DIM)
    weights = model.get_weights(autoencoder)

    weights[0][:] = 0.0

    assert model.get_weights(autoencoder)[0].any()


def test_set_weights_rejects_a_wrong_number_of_arrays() -> None:
    autoencoder = model.build_autoencoder(INPUT_DIM)

    with pytest.raises(ValueError, match="expected 8 arrays"):
        model.set_weights(autoencoder, model.get_weights(autoencoder)[:-1])


def test_building_a_model_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)

    model.build_autoencoder(INPUT_DIM, seed=7)

    assert torch.equal(torch.rand(1), expected)


def test_local_training_is_deterministic_given_the_seed() -> None:
    x, _ = blobs(200, seed=0)
    runs = []
    for _ in range(2):
        autoencoder = model.build_autoencoder(INPUT_DIM, seed=0)
        loss = model.train_autoencoder(
            autoencoder, x, local_steps=10, batch_size=16, lr=1e-2, seed=5
        )
        runs.append((loss, model.get_weights(autoencoder)))

    assert runs[0][0] == runs[1][0]
    assert all(
        np.array_equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True)
    )


def test_local_training_cycles_over_data_smaller_than_the_steps_need() -> None:
    x, _ = blobs(20, seed=0)
    autoencoder = model.build_autoencoder(INPUT_DIM)
    before = model.reconstruction_mse(autoencoder, x)

    loss = model.train_autoencoder(
        autoencoder, x, local_steps=200, batch_size=8, lr=1e-2, seed=0
    )

    assert np.isfinite(loss)
    assert model.reconstruction_mse(autoencoder, x) < before / 2


def test_local_training_refuses_empty_data() -> None:
    autoencoder = model.build_autoencoder(INPUT_DIM)
    empty = np.zeros((0, INPUT_DIM), dtype=np.float32)

    with pytest.raises(ValueError, match="empty"):
        model.train_autoencoder(
            autoencoder, empty, local_steps=1, batch_size=8, lr=1e-3, seed=0
        )


def test_the_head_separates_separable_classes_and_reports_three_scores() -> None:
    server_x, server_y = blobs(100, seed=1)
    test_x, test_y = blobs(400, seed=2)
    autoencoder = model.build_autoencoder(INPUT_DIM, seed=0)
    model.train_autoencoder(
        autoencoder, test_x, local_steps=100, batch_size=32, lr=1e-2, seed=0
    )

    scores = model.train_head_and_evaluate(
        autoencoder, server_x, server_y, test_x, test_y, seed=0
    )

    assert set(scores) == {"auroc", "f1", "accuracy"}
    assert scores["auroc"] > 0.95
    assert scores["accuracy"] > 0.9


def test_the_head_is_deterministic_given_the_seed() -> None:
    server_x, server_y = blobs(60, seed=1)
    test_x, test_y = blobs(100, seed=2)
    autoencoder = model.build_autoencoder(INPUT_DIM, seed=0)

    first, again = (
        model.train_head_and_evaluate(
            autoencoder, server_x, server_y, test_x, test_y, seed=4
        )
        for _ in range(2)
    )

    assert first == again
