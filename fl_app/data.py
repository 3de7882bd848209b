"""Load the FLUIDS datasets and split them for a federated run.

Two datasets are supported, read from a data directory (``MESHCTL_DATA_DIR`` or
an explicit argument) laid out as :mod:`fl_app.fetch` lists:

- ``ton_iot``: TON_IoT network flows. Addresses and ports are dropped from the
  features because the attackers sit at known addresses; the attack name is
  kept as metadata only. Rows are deduplicated on features plus label before
  any split, so no flow appears on both sides of a split.
- ``nsl_kdd``: NSL-KDD, with its own training and test files.

A federated split holds out a global test set, a small labelled server set,
and spreads the rest over clients by device or by a Dirichlet draw over the
attack type. Features are log1p plus min-max scaled numbers and one-hot
categories, fitted on the training part only and clipped to [0, 1].
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fl_app import fetch

DATA_DIR_ENV = "MESHCTL_DATA_DIR"
DATASET_NAMES = ("ton_iot", "nsl_kdd")

TON_IOT_ADDRESS_COLUMNS = ("src_ip", "dst_ip", "src_port", "dst_port")
TON_IOT_NUMERIC_COLUMNS = (
    "duration",
    "src_bytes",
    "dst_bytes",
    "missed_bytes",
    "src_pkts",
    "src_ip_bytes",
    "dst_pkts",
    "dst_ip_bytes",
    "dns_qclass",
    "dns_qtype",
    "dns_rcode",
    "http_request_body_len",
    "http_response_body_len",
    "http_status_code",
)
ATTACKER_PREFIX = "192.168.1."
ATTACKER_HOSTS = range(30, 40)
TON_IOT_MAX_CATEGORIES = 12
TON_IOT_MIN_CATEGORY_ROWS = 10

NSL_KDD_COLUMNS = (
    "duration protocol_type service flag src_bytes dst_bytes land wrong_fragment "
    "urgent hot num_failed_logins logged_in num_compromised root_shell "
    "su_attempted num_root num_file_creations num_shells num_access_files "
    "num_outbound_cmds is_host_login is_guest_login count srv_count serror_rate "
    "srv_serror_rate rerror_rate srv_rerror_rate same_srv_rate diff_srv_rate "
    "srv_diff_host_rate dst_host_count dst_host_srv_count dst_host_same_srv_rate "
    "dst_host_diff_srv_rate dst_host_same_src_port_rate dst_host_srv_diff_host_rate "
    "dst_host_serror_rate dst_host_srv_serror_rate dst_host_rerror_rate "
    "dst_host_srv_rerror_rate attack difficulty"
).split()
NSL_KDD_CATEGORICAL_COLUMNS = ("protocol_type", "service", "flag")
NSL_KDD_TRAIN_FILE = "nsl_kdd/KDDTrain+_20Percent.txt"
NSL_KDD_TEST_FILE = "nsl_kdd/KDDTest+.txt"

DIRICHLET_ALPHA = 0.5
TEST_FRACTION = 0.2
MIN_DEVICE_CLIENT_ROWS = 500
MIN_DIRICHLET_CLIENT_ROWS = 10
DIRICHLET_ATTEMPTS = 100


class DataError(Exception):
    """A data directory or file is missing or unreadable."""


@dataclass(frozen=True)
class LabelledFrame:
    """Raw features with their target and metadata, one row per example.

    ``features`` holds no leaking column; ``attack_type`` ("normal" for benign
    rows) and ``device`` are metadata for splitting, never model inputs.
    """

    features: pd.DataFrame
    label: np.ndarray
    attack_type: np.ndarray
    device: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.features)

    def take(self, rows: np.ndarray) -> LabelledFrame:
        """Return the rows at positions ``rows``."""
        return LabelledFrame(
            features=self.features.iloc[rows].reset_index(drop=True),
            label=self.label[rows],
            attack_type=self.attack_type[rows],
            device=None if self.device is None else self.device[rows],
        )


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset; ``test`` is None when the test set is drawn at split time."""

    name: str
    train: LabelledFrame
    test: LabelledFrame | None
    numeric_columns: tuple[str, ...]
    categorical_columns: tuple[str, ...]


@dataclass(frozen=True)
class FeatureEncoder:
    """log1p + min-max for numbers, one-hot over a fixed vocabulary for categories.

    Values outside the fitted range are clipped to [0, 1]; a category outside
    the vocabulary encodes as all zeros in its column's block.
    """

    numeric_columns: tuple[str, ...]
    log_min: tuple[float, ...]
    log_max: tuple[float, ...]
    vocabulary: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Names of the encoded columns, numbers first."""
        one_hot = tuple(f"{col}={value}" for col, vs in self.vocabulary for value in vs)
        return self.numeric_columns + one_hot

    def transform(self, features: pd.DataFrame) -> np.ndarray:
        """Encode ``features`` into a float32 matrix with values in [0, 1]."""
        numeric = np.log1p(
            features[list(self.numeric_columns)].to_numpy(np.float64).clip(min=0)
        )
        low, high = np.asarray(self.log_min), np.asarray(self.log_max)
        scaled = (numeric - low) / np.where(high > low, high - low, 1.0)
        blocks = [scaled.clip(0.0, 1.0)]
        for column, values in self.vocabulary:
            observed = features[column].astype(str).to_numpy()
            blocks.append(observed[:, None] == np.asarray(values, dtype=object))
        return np.hstack(blocks).astype(np.float32)


@dataclass(frozen=True)
class FederatedData:
    """Everything a federated run needs, as float32 feature matrices.

    ``clients`` are unlabelled; ``client_labels`` are kept for analysis only and
    must not reach a client. ``client_devices`` names the devices whose flows
    each client holds (empty tuples when the dataset has no device).
    """

    clients: list[np.ndarray]
    client_labels: list[np.ndarray]
    client_devices: list[tuple[str, ...]]
    server_x: np.ndarray
    server_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    feature_names: tuple[str, ...]

    @property
    def input_dim(self) -> int:
        """Width of every feature matrix."""
        return len(self.feature_names)

    @property
    def client_sizes(self) -> list[int]:
        """Number of rows of each client."""
        return [len(x) for x in self.clients]


def resolve_data_dir(data_dir: Path | str | None = None) -> Path:
    """Return the data directory: ``data_dir``, else ``$MESHCTL_DATA_DIR``."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if not chosen:
        raise DataError(
            f"no data directory: set {DATA_DIR_ENV} or pass one; "
            "`meshctl data fetch` downloads the datasets, "
            "`meshctl data fetch --from DIR` imports a local copy"
        )
    path = Path(chosen)
    if path.exists() and not path.is_dir():
        raise DataError(
            f"data directory {path} is not a directory (set by --data-dir or "
            f"{DATA_DIR_ENV})"
        )
    if not path.is_dir():
        raise DataError(
            f"data directory {path} does not exist (set by --data-dir or "
            f"{DATA_DIR_ENV}); `meshctl data fetch --dest {path}` downloads the "
            "datasets into it, `meshctl data fetch --from DIR` imports a local copy"
        )
    if not os.access(path, os.R_OK | os.X_OK):
        raise DataError(
            f"data directory {path} is not readable by this user (set by "
            f"--data-dir or {DATA_DIR_ENV}); give it read and search permission"
        )
    return path


def check_readable(
    dataset: str, data_dir: Path | str | None = None
) -> tuple[Path, ...]:
    """Return the paths of ``dataset``'s files once each is present and readable.

    Cheap (one byte read per file, no checksum), so that a run can refuse a bad
    data directory before it starts anything; loading checks the checksums.
    """
    return tuple(
        _require_readable(dataset, relative, data_dir)
        for relative in fetch.required_files(dataset)
    )


def require_file(
    dataset: str, relative_path: str, data_dir: Path | str | None = None
) -> Path:
    """Return the path of one data file, or raise :class:`DataError` saying how
    to obtain it."""
    path = _require_readable(dataset, relative_path, data_dir)
    _check_intact(dataset, relative_path, path)
    return path


def _require_readable(
    dataset: str, relative_path: str, data_dir: Path | str | None
) -> Path:
    """The path of one data file, once it is known to exist and to be readable."""
    path = resolve_data_dir(data_dir) / relative_path
    try:
        path.stat()
    except FileNotFoundError:
        pass  # reported below as missing, with where to get it
    except OSError as exc:  # a directory on the way that this user cannot search
        raise DataError(
            f"cannot read data file {path}: {exc.strerror}; check the permissions "
            "of the data directory and the directories inside it"
        ) from exc
    if not path.is_file():
        origin = fetch.dataset_source(dataset).origin
        raise DataError(
            f"missing data file {path} (from {origin}); `meshctl data fetch` "
            "downloads it, `meshctl data fetch --from DIR` imports a local copy"
        )
    try:
        with path.open("rb") as stream:
            stream.read(1)
    except OSError as exc:
        raise DataError(
            f"cannot read data file {path}: {exc.strerror or exc}; check its "
            "permissions"
        ) from exc
    return path


def _check_intact(dataset: str, relative_path: str, path: Path) -> None:
    """Raise :class:`DataError` when a catalogued file's SHA-256 is not the pinned
    one: a damaged file would otherwise train on garbage, or fail far from here."""
    pinned = {f.relative_path: f.sha256 for f in fetch.dataset_source(dataset).files}
    expected = pinned.get(relative_path)
    if expected is None:
        return
    actual = fetch.sha256_of(path)
    if actual != expected:
        raise DataError(
            f"data file {path} is damaged: SHA-256 {actual}, expected {expected}; "
            "`meshctl data fetch` downloads it again, `meshctl data fetch --from DIR` "
            "imports an intact copy"
        )


def load_dataset(name: str, data_dir: Path | str | None = None) -> Dataset:
    """Load dataset ``name`` ("ton_iot" or "nsl_kdd") with leaking columns removed."""
    if name == "ton_iot":
        return _load_ton_iot(data_dir)
    if name == "nsl_kdd":
        return _load_nsl_kdd(data_dir)
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")


def read_ton_iot_csv(path: Path) -> pd.DataFrame:
    """Read a TON_IoT network CSV (UTF-8, optionally with a byte-order mark)."""
    return pd.read_csv(path, encoding="utf-8-sig", low_memory=False)


def endpoint_device(src_ip: np.ndarray, dst_ip: np.ndarray) -> np.ndarray:
    """Return the local endpoint of each flow: ``dst_ip`` when ``src_ip`` is an
    attacker (192.168.1.30-39), else ``src_ip``."""
    return np.where(_is_attacker(src_ip), dst_ip, src_ip).astype(object)


def ton_iot_frame(raw: pd.DataFrame) -> LabelledFrame:
    """Turn raw TON_IoT rows into deduplicated features, label and metadata.

    The device is derived before addresses and ports are dropped. Rows equal on
    features plus label are kept once (the first occurrence, with its device
    and attack name).
    """
    device = endpoint_device(raw["src_ip"].to_numpy(), raw["dst_ip"].to_numpy())
    features = raw.drop(columns=[*TON_IOT_ADDRESS_COLUMNS, "type", "label"])
    frame = LabelledFrame(
        features=features,
        label=raw["label"].to_numpy(np.int64),
        attack_type=raw["type"].astype(str).to_numpy(object),
        device=device,
    )
    return deduplicate(frame)


def deduplicate(frame: LabelledFrame) -> LabelledFrame:
    """Keep the first of the rows that are equal on features plus label."""
    keyed = frame.features.assign(__label__=frame.label)
    keep = np.flatnonzero(~keyed.duplicated(keep="first").to_numpy())
    return frame.take(keep)


def read_nsl_kdd(path: Path) -> LabelledFrame:
    """Read an NSL-KDD file: 41 features, the attack name and a dropped difficulty."""
    raw = pd.read_csv(path, header=None, names=NSL_KDD_COLUMNS)
    attack = raw["attack"].astype(str).to_numpy(object)
    return LabelledFrame(
        features=raw.drop(columns=["attack", "difficulty"]),
        label=(attack != "normal").astype(np.int64),
        attack_type=attack,
    )


def fit_encoder(
    features: pd.DataFrame,
    numeric_columns: tuple[str, ...],
    categorical_columns: tuple[str, ...],
    *,
    max_categories: int | None = None,
    min_category_rows: int = 1,
) -> FeatureEncoder:
    """Fit the scaler and the category vocabulary on ``features`` only.

    Each categorical column keeps its most frequent values, at most
    ``max_categories`` of them, each seen in at least ``min_category_rows`` rows.
    """
    log_values = np.log1p(
        features[list(numeric_columns)].to_numpy(np.float64).clip(min=0)
    )
    vocabulary = tuple(
        (column, _top_values(features[column], max_categories, min_category_rows))
        for column in categorical_columns
    )
    return FeatureEncoder(
        numeric_columns=tuple(numeric_columns),
        log_min=tuple(log_values.min(axis=0).tolist()),
        log_max=tuple(log_values.max(axis=0).tolist()),
        vocabulary=vocabulary,
    )


def holdout_indices(
    strata: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split positions into (kept, held out), holding ``fraction`` of each stratum."""
    rng = np.random.default_rng(seed)
    held = []
    for stratum in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == stratum))
        held.append(members[: int(round(fraction * len(members)))])
    held_rows = np.sort(np.concatenate(held))
    kept_rows = np.setdiff1d(np.arange(len(strata)), held_rows)
    return kept_rows, held_rows


def split_by_device(
    devices: np.ndarray,
    num_clients: int,
    *,
    min_client_rows: int = MIN_DEVICE_CLIENT_ROWS,
) -> list[np.ndarray]:
    """Assign rows to exactly ``num_clients`` clients, never splitting a device.

    Devices are ordered by row count (largest first, ties by name). Each device
    with at least ``min_client_rows`` rows becomes its own client, up to
    ``num_clients - 1`` of them; the remaining devices (the long tail) are dealt
    round-robin, largest first, into the remaining clients, which keeps those
    pooled clients of similar size. With exactly ``num_clients`` devices each
    is its own client. Returns the row positions of each client.
    """
    names, sizes = np.unique(devices, return_counts=True)
    if num_clients < 1 or num_clients > len(names):
        raise ValueError(
            f"the device split has {len(names)} devices, so between 1 and "
            f"{len(names)} clients, not {num_clients} (a Dirichlet split allows more)"
        )
    order = np.lexsort((names, -sizes))
    names, sizes = names[order], sizes[order]
    own = min(int((sizes >= min_client_rows).sum()), num_clients - 1)
    if len(names) == num_clients:
        own = num_clients
    client_of = {name: client for client, name in enumerate(names[:own])}
    pools = num_clients - own
    for position, name in enumerate(names[own:]):
        client_of[name] = own + position % pools
    assignment = np.fromiter((client_of[d] for d in devices), np.int64, len(devices))
    return [np.flatnonzero(assignment == client) for client in range(num_clients)]


def split_dirichlet(
    groups: np.ndarray,
    num_clients: int,
    *,
    seed: int,
    alpha: float = DIRICHLET_ALPHA,
    min_client_rows: int = MIN_DIRICHLET_CLIENT_ROWS,
) -> list[np.ndarray]:
    """Spread each group's rows over clients with Dirichlet(``alpha``) shares.

    Draws again (from the same seeded generator) until every client holds at
    least ``min_client_rows`` rows. Returns the row positions of each client.
    """
    rng = np.random.default_rng(seed)
    for _ in range(DIRICHLET_ATTEMPTS):
        parts = _dirichlet_draw(groups, num_clients, alpha, rng)
        if min(len(part) for part in parts) >= min_client_rows:
            return parts
    raise ValueError(
        f"no Dirichlet({alpha}) split of {len(groups)} rows gives {num_clients} "
        f"clients of at least {min_client_rows} rows; use fewer clients"
    )


def prepare_federated(
    name: str,
    num_clients: int,
    seed: int,
    server_fraction: float = 0.01,
    split: str | None = None,
    data_dir: Path | str | None = None,
) -> FederatedData:
    """Load ``name`` and split it into a test set, a server set and clients.

    TON_IoT's test set is a seeded 20% of the deduplicated rows, stratified by
    attack type; NSL-KDD uses KDDTest+. ``server_fraction`` of the remaining
    training rows, stratified by attack type, form the labelled server set.
    The rest is split over ``num_clients`` clients by device (TON_IoT only, see
    :func:`split_by_device`) or by a Dirichlet draw over the attack type
    (:func:`split_dirichlet`); ``split=None`` means by device for TON_IoT and
    Dirichlet for NSL-KDD. The encoder is fitted on the training rows
    (server and clients) only. A training row whose encoding equals a test
    row is dropped, so no test vector appears in the training data.
    """
    if split not in (None, "device", "dirichlet"):
        raise ValueError(f"unknown split {split!r}; use 'device' or 'dirichlet'")
    dataset = load_dataset(name, data_dir)
    train, test = _train_test(dataset, seed)
    split = split or ("dirichlet" if train.device is None else "device")
    if split == "device" and train.device is None:
        raise ValueError(f"{name} has no devices; use split='dirichlet'")

    pool_rows, server_rows = holdout_indices(
        train.attack_type, server_fraction, seed + 1
    )
    pool = train.take(pool_rows)
    if split == "device":
        parts = split_by_device(pool.device, num_clients)
    else:
        parts = split_dirichlet(pool.attack_type, num_clients, seed=seed + 2)

    encoder = _fit_dataset_encoder(dataset, train.features)
    test_x = encoder.transform(test.features)
    server = _encode_unseen(encoder, train.take(server_rows), test_x)
    clients = [_encode_unseen(encoder, pool.take(rows), test_x) for rows in parts]
    return FederatedData(
        clients=[x for x, _, _ in clients],
        client_labels=[y for _, y, _ in clients],
        client_devices=[devices for _, _, devices in clients],
        server_x=server[0],
        server_y=server[1],
        test_x=test_x,
        test_y=test.label.astype(np.int64),
        feature_names=encoder.feature_names,
    )


def save_client_shard(path: Path | str, x: np.ndarray) -> None:
    """Write one client's feature matrix to an ``.npz`` file."""
    np.savez(path, x=np.asarray(x, dtype=np.float32))


def load_client_shard(path: Path | str) -> np.ndarray:
    """Read a feature matrix written by :func:`save_client_shard`."""
    with np.load(path) as shard:
        return shard["x"]


def _load_ton_iot(data_dir: Path | str | None) -> Dataset:
    (relative,) = fetch.required_files("ton_iot")
    raw = read_ton_iot_csv(require_file("ton_iot", relative, data_dir))
    frame = ton_iot_frame(raw)
    numeric = TON_IOT_NUMERIC_COLUMNS
    categorical = tuple(c for c in frame.features.columns if c not in numeric)
    return Dataset("ton_iot", frame, None, numeric, categorical)


def _load_nsl_kdd(data_dir: Path | str | None) -> Dataset:
    train = read_nsl_kdd(require_file("nsl_kdd", NSL_KDD_TRAIN_FILE, data_dir))
    test = read_nsl_kdd(require_file("nsl_kdd", NSL_KDD_TEST_FILE, data_dir))
    categorical = NSL_KDD_CATEGORICAL_COLUMNS
    numeric = tuple(c for c in train.features.columns if c not in categorical)
    return Dataset("nsl_kdd", train, test, numeric, categorical)


def _train_test(dataset: Dataset, seed: int) -> tuple[LabelledFrame, LabelledFrame]:
    if dataset.test is not None:
        return dataset.train, dataset.test
    kept, held = holdout_indices(dataset.train.attack_type, TEST_FRACTION, seed)
    return dataset.train.take(kept), dataset.train.take(held)


def _fit_dataset_encoder(dataset: Dataset, features: pd.DataFrame) -> FeatureEncoder:
    # TON_IoT's free-text columns (DNS queries, URIs) have long tails; only their
    # frequent values become one-hot columns. NSL-KDD's vocabularies are small.
    if dataset.name == "ton_iot":
        limits = {
            "max_categories": TON_IOT_MAX_CATEGORIES,
            "min_category_rows": TON_IOT_MIN_CATEGORY_ROWS,
        }
    else:
        limits = {}
    return fit_encoder(
        features, dataset.numeric_columns, dataset.categorical_columns, **limits
    )


def _encode_unseen(
    encoder: FeatureEncoder, frame: LabelledFrame, test_x: np.ndarray
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    x = encoder.transform(frame.features)
    keep = ~np.isin(_row_keys(x), _row_keys(test_x))
    devices = () if frame.device is None else tuple(sorted(set(frame.device[keep])))
    return x[keep], frame.label[keep].astype(np.int64), devices


def _row_keys(x: np.ndarray) -> np.ndarray:
    """View each row of a 2-D array as one opaque value, for set operations."""
    contiguous = np.ascontiguousarray(x)
    row_type = np.dtype((np.void, contiguous.dtype.itemsize * contiguous.shape[1]))
    return contiguous.view(row_type).ravel()


def _top_values(
    column: pd.Series, max_categories: int | None, min_rows: int
) -> tuple[str, ...]:
    counts = column.astype(str).value_counts(sort=True)
    counts = counts[counts >= min_rows]
    frequent = counts.sort_index(kind="stable").sort_values(
        ascending=False, kind="stable"
    )
    return tuple(frequent.index[:max_categories].tolist())


def _is_attacker(ips: np.ndarray) -> np.ndarray:
    text = pd.Series(ips, dtype=str)
    host = pd.to_numeric(
        text.str.removeprefix(ATTACKER_PREFIX).where(
            text.str.startswith(ATTACKER_PREFIX)
        ),
        errors="coerce",
    )
    return host.between(ATTACKER_HOSTS.start, ATTACKER_HOSTS.stop - 1).to_numpy()


def _dirichlet_draw(
    groups: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for group in np.unique(groups):
        members = rng.permutation(np.flatnonzero(groups == group))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, rows in enumerate(np.split(members, cuts)):
            parts[client].append(rows)
    return [np.sort(np.concatenate(rows)) for rows in parts]
