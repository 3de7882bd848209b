"""Loading, cleaning and splitting of the FLUIDS datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fl_app import data, fetch

TON_IOT_UNIQUE_ROWS = 93_732
LEAKING_COLUMNS = {"src_ip", "dst_ip", "src_port", "dst_port", "type", "label"}


@pytest.fixture(scope="module")
def ton_iot_split(data_dir: Path) -> data.FederatedData:
    return data.prepare_federated("ton_iot", 20, seed=0, data_dir=data_dir)


def ton_iot_rows(rows: list[dict[str, object]]) -> pd.DataFrame:
    """Build a tiny raw TON_IoT frame; unspecified columns take plain defaults."""
    defaults = {
        "src_ip": "192.168.1.5",
        "src_port": 1000,
        "dst_ip": "192.168.1.6",
        "dst_port": 80,
        "proto": "tcp",
        "duration": 0.5,
        "src_bytes": 10,
        "label": 0,
        "type": "normal",
    }
    return pd.DataFrame([{**defaults, **row} for row in rows])


def row_set(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in np.ascontiguousarray(x)}


# Data directory and missing files


def test_a_missing_directory_raises_data_error_naming_it_and_the_fetch_command(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "nowhere"

    with pytest.raises(data.DataError) as caught:
        data.load_dataset("ton_iot", missing)

    assert str(missing) in str(caught.value)
    assert "meshctl data fetch" in str(caught.value)
    assert "--from DIR" in str(caught.value)


@pytest.mark.parametrize(
    ("name", "source_word"),
    [
        pytest.param("ton_iot", "UNSW Canberra", id="ton_iot"),
        pytest.param("nsl_kdd", "University of New Brunswick", id="nsl_kdd"),
    ],
)
def test_a_missing_file_raises_data_error_naming_path_source_and_fetch(
    tmp_path: Path, name: str, source_word: str
) -> None:
    with pytest.raises(data.DataError) as caught:
        data.load_dataset(name, tmp_path)

    message = str(caught.value)
    assert str(tmp_path / fetch.required_files(name)[0]) in message
    assert source_word in message
    assert "meshctl data fetch" in message


def test_the_environment_variable_chooses_the_data_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))

    assert data.resolve_data_dir() == tmp_path


def test_no_directory_at_all_raises_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)

    with pytest.raises(data.DataError, match=data.DATA_DIR_ENV):
        data.resolve_data_dir()


def test_the_loader_reads_the_files_that_fetch_installs() -> None:
    nsl_files = fetch.required_files("nsl_kdd")

    assert data.NSL_KDD_TRAIN_FILE in nsl_files
    assert data.NSL_KDD_TEST_FILE in nsl_files


# TON_IoT cleaning


def test_a_byte_order_mark_does_not_leak_into_the_first_column_name(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("src_ip,label\n192.168.1.5,0\n".encode("utf-8-sig"))

    frame = data.read_ton_iot_csv(path)

    assert list(frame.columns) == ["src_ip", "label"]


@pytest.mark.parametrize(
    ("src_ip", "dst_ip", "device"),
    [
        pytest.param("192.168.1.30", "192.168.1.5", "192.168.1.5", id="attacker-30"),
        pytest.param("192.168.1.39", "10.0.0.1", "10.0.0.1", id="attacker-39"),
        pytest.param("192.168.1.40", "192.168.1.5", "192.168.1.40", id="not-40"),
        pytest.param("192.168.1.3", "192.168.1.5", "192.168.1.3", id="not-3"),
        pytest.param(
            "192.168.1.193", "192.168.1.37", "192.168.1.193", id="to-attacker"
        ),
        pytest.param("fe80::1", "192.168.1.5", "fe80::1", id="ipv6"),
    ],
)
def test_the_device_is_the_local_endpoint_of_a_flow(
    src_ip: str, dst_ip: str, device: str
) -> None:
    found = data.endpoint_device(np.array([src_ip]), np.array([dst_ip]))

    assert found.tolist() == [device]


def test_addresses_ports_and_attack_type_are_not_features() -> None:
    raw = ton_iot_rows([{"label": 1, "type": "ddos"}])

    frame = data.ton_iot_frame(raw)

    assert set(frame.features.columns) == {"proto", "duration", "src_bytes"}
    assert frame.attack_type.tolist() == ["ddos"]
    assert frame.label.tolist() == [1]


def test_rows_equal_on_features_and_label_are_kept_once() -> None:
    raw = ton_iot_rows(
        [
            {"src_port": 1, "dst_ip": "192.168.1.7"},
            {"src_port": 2, "dst_ip": "192.168.1.8"},
            {"src_port": 3, "label": 1, "type": "dos"},
            {"src_port": 4, "duration": 9.0},
        ]
    )

    frame = data.ton_iot_frame(raw)

    assert len(frame) == 3
    assert frame.label.tolist() == [0, 1, 0]
    assert frame.features["duration"].tolist() == [0.5, 0.5, 9.0]


# Encoding


def test_the_encoder_learns_range_and_vocabulary_from_its_input_only() -> None:
    train = pd.DataFrame({"bytes": [0, 9, 99], "proto": ["tcp", "tcp", "udp"]})
    test = pd.DataFrame({"bytes": [999], "proto": ["icmp"]})

    encoder = data.fit_encoder(train, ("bytes",), ("proto",))
    encoded = encoder.transform(test)

    assert encoder.log_max == (pytest.approx(np.log1p(99)),)
    assert encoder.feature_names == ("bytes", "proto=tcp", "proto=udp")
    assert encoded.tolist() == [[1.0, 0.0, 0.0]]


def test_the_encoder_keeps_only_frequent_categories() -> None:
    train = pd.DataFrame({"n": [1] * 6, "uri": ["/a"] * 3 + ["/b"] * 2 + ["/c"]})

    encoder = data.fit_encoder(
        train, ("n",), ("uri",), max_categories=2, min_category_rows=2
    )

    assert encoder.feature_names == ("n", "uri=/a", "uri=/b")


# Splits


def test_a_holdout_takes_the_fraction_of_each_stratum() -> None:
    strata = np.array(["a"] * 100 + ["b"] * 300)

    kept, held = data.holdout_indices(strata, 0.2, seed=0)

    assert (strata[held] == "a").sum() == 20
    assert (strata[held] == "b").sum() == 60
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(400))


def test_a_device_split_keeps_each_device_in_one_client_and_fills_all() -> None:
    sizes = {
        "big1": 900,
        "big2": 700,
        "big3": 600,
        **{f"t{i}": 10 + i for i in range(9)},
    }
    devices = np.array([name for name, size in sizes.items() for _ in range(size)])

    parts = data.split_by_device(devices, 5, min_client_rows=500)

    assert len(parts) == 5
    assert all(len(part) > 0 for part in parts)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(devices)))
    owners = {
        d: {i for i, p in enumerate(parts) if d in set(devices[p])} for d in sizes
    }
    assert all(len(clients) == 1 for clients in owners.values())
    assert [set(devices[p]) for p in parts[:3]] == [{"big1"}, {"big2"}, {"big3"}]


def test_a_device_split_refuses_more_clients_than_devices() -> None:
    devices = np.array(["a", "b", "c"])

    with pytest.raises(ValueError, match="Dirichlet"):
        data.split_by_device(devices, 4)


def test_a_dirichlet_split_is_seeded_and_covers_every_row_once() -> None:
    groups = np.repeat(np.array(["normal", "dos", "scan", "xss"]), 250)

    first = data.split_dirichlet(groups, 8, seed=3)
    again = data.split_dirichlet(groups, 8, seed=3)

    assert len(first) == 8
    assert min(len(part) for part in first) >= data.MIN_DIRICHLET_CLIENT_ROWS
    assert sorted(np.concatenate(first).tolist()) == list(range(len(groups)))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


def test_a_client_shard_round_trips_through_a_file(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((7, 3)).astype(np.float32)

    data.save_client_shard(tmp_path / "client-0.npz", x)

    assert np.array_equal(data.load_client_shard(tmp_path / "client-0.npz"), x)


# Real data


@pytest.mark.data
def test_ton_iot_keeps_the_unique_rows_on_features_plus_label(data_dir: Path) -> None:
    dataset = data.load_dataset("ton_iot", data_dir)

    keyed = dataset.train.features.assign(label=dataset.train.label)
    assert len(dataset.train) == TON_IOT_UNIQUE_ROWS
    assert not keyed.duplicated().any()


@pytest.mark.data
def test_ton_iot_features_hold_no_address_port_or_attack_type(
    ton_iot_split: data.FederatedData,
) -> None:
    sources = {name.split("=")[0] for name in ton_iot_split.feature_names}

    assert sources & LEAKING_COLUMNS == set()
    attackers = {f"192.168.1.{host}" for host in range(30, 40)}
    values = {name.partition("=")[2] for name in ton_iot_split.feature_names}
    assert values & attackers == set()
    assert 100 <= ton_iot_split.input_dim <= 120


@pytest.mark.data
def test_ton_iot_device_split_gives_exactly_n_clients_with_disjoint_devices(
    ton_iot_split: data.FederatedData,
) -> None:
    devices = [d for held in ton_iot_split.client_devices for d in held]

    assert len(ton_iot_split.clients) == 20
    assert min(ton_iot_split.client_sizes) >= 100
    assert len(devices) == len(set(devices))


@pytest.mark.data
def test_ton_iot_server_set_is_about_one_percent_of_training_rows(
    ton_iot_split: data.FederatedData,
) -> None:
    training_rows = sum(ton_iot_split.client_sizes) + len(ton_iot_split.server_x)

    assert len(ton_iot_split.server_x) / training_rows == pytest.approx(0.01, rel=0.1)
    assert set(np.unique(ton_iot_split.server_y)) == {0, 1}


@pytest.mark.data
def test_no_test_row_appears_in_a_client_shard_or_the_server_set(
    ton_iot_split: data.FederatedData,
) -> None:
    test_rows = row_set(ton_iot_split.test_x)

    for x in [*ton_iot_split.clients, ton_iot_split.server_x]:
        assert test_rows.isdisjoint(row_set(x))


@pytest.mark.data
def test_ton_iot_features_are_float32_in_the_unit_interval(
    ton_iot_split: data.FederatedData,
) -> None:
    for x in [*ton_iot_split.clients, ton_iot_split.test_x]:
        assert x.dtype == np.float32
        assert 0.0 <= x.min() and x.max() <= 1.0


@pytest.mark.data
def test_the_encoder_is_fitted_on_training_rows_only(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fitted_rows = []
    real_fit = data.fit_encoder

    def recording_fit(features: pd.DataFrame, *args: object, **kwargs: object):
        fitted_rows.append(len(features))
        return real_fit(features, *args, **kwargs)

    monkeypatch.setattr(data, "fit_encoder", recording_fit)
    split = data.prepare_federated("ton_iot", 20, seed=0, data_dir=data_dir)

    assert fitted_rows == [TON_IOT_UNIQUE_ROWS - len(split.test_y)]


@pytest.mark.data
def test_nsl_kdd_uses_its_own_test_file_and_a_dirichlet_split(data_dir: Path) -> None:
    split = data.prepare_federated("nsl_kdd", 10, seed=0, data_dir=data_dir)

    assert len(split.test_y) == 22_544
    assert split.input_dim == 118
    assert len(split.clients) == 10
    assert split.client_devices == [()] * 10


def test_a_damaged_data_file_is_refused_naming_it(
    tmp_path: Path, data_dir: Path
) -> None:
    damaged = tmp_path / "ton_iot_network" / "toniot.csv.gz"
    damaged.parent.mkdir()
    original = (data_dir / "ton_iot_network" / "toniot.csv.gz").read_bytes()
    damaged.write_bytes(
        original[:1000] + bytes([original[1000] ^ 0xFF]) + original[1001:]
    )

    with pytest.raises(data.DataError, match="toniot.csv.gz is damaged"):
        data.load_dataset("ton_iot", tmp_path)
