"""The result store of a counterfactual run: one HDF5 file, appended batch by batch, read back lazily.

Layout of ``results.h5`` (a format / version attribute marks it as a cfx store)::

    /                  attrs: format = "cfx.results", version, metadata (JSON: what made the results),
                              columns (JSON: the per-pair record keys), extras (JSON: the declared extras'
                              dtypes and per-pair shapes; absent in older stores), rows (pairs committed), finished
    /pairs/<key>       (rows,) one dataset per record entry of PAIR_SCHEMA, in its schema dtype
    /images/originals  (rows, C, H, W) the queries; attr encoding = "uint8" (exact k/255 values) or "float16"
    /images/counterfactuals, /images/path (rows, K, C, H, W, only when the explainer recorded a path)
    /extras/<name>     (rows, ...) method-specific per-pair tensors: an explainer's ``details`` (e.g.
                       GenerativeIntrospection's ``top_attributes``), declared when the store is made

Every dataset is chunked, compressed and resizable. A batch is appended, flushed, and only then counted in
``rows``: a run killed mid-batch leaves the rows before it intact, and readers trust only committed rows.
Read a store with :func:`open_results`; :class:`StoreWriter` and :func:`merge_stores` write them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from cfx.io import atomic_path
from cfx.metrics.functional.counterfactual import (
    PAIR_SCHEMA,
    _counterfactual_compute,
    check_record,
    empty_record,
    record_keys,
)

STORE_FORMAT = "cfx.results"
STORE_VERSION = 1
STORE_FILENAME = "results.h5"
IMAGE_KEYS = ("originals", "counterfactuals")
_CHUNK_BYTES = 1 << 20  # ~1 MiB chunks of image rows
_COPY_ROWS_BYTES = 64 << 20  # merge / migrate in pieces of about this size: memory stays bounded
EXTRA_DTYPES = (
    torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
    torch.bool,
)  # fmt: skip

ExtraFields = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]

Rows = slice | int | Sequence[int] | Tensor | np.ndarray | None


def _encode_extra_fields(fields: ExtraFields) -> str:
    """The declared extras as JSON: ``{name: {"dtype": "int64", "shape": [5]}}``; ``ValueError`` if unstorable."""
    encoded = {}
    for name, (dtype, shape) in fields.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"an extra's name must be a non-empty string without '/', got {name!r}")
        if dtype not in EXTRA_DTYPES:
            raise ValueError(f"extra {name!r}: dtype must be one of {[str(d) for d in EXTRA_DTYPES]}, got {dtype}")
        if not all(isinstance(size, int) and size >= 0 for size in shape):
            raise ValueError(f"extra {name!r}: shape must be non-negative integers, got {shape}")
        encoded[name] = {"dtype": str(dtype).removeprefix("torch."), "shape": [int(size) for size in shape]}
    return json.dumps(encoded)


def _decode_extra_fields(text: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {name: (getattr(torch, field["dtype"]), tuple(field["shape"])) for name, field in json.loads(text).items()}


def store_path(path: str | Path) -> Path:
    """The store file of ``path``: ``path`` itself, or ``path / results.h5`` when ``path`` is a folder."""
    path = Path(path)
    return path / STORE_FILENAME if path.is_dir() else path


def _read_attributes(path: Path) -> dict[str, Any]:
    """Check that ``path`` is a readable cfx store and return its root attributes (metadata and columns decoded).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not HDF5, truncated or corrupt, not a cfx store, or of another store version.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"no counterfactual results at {path.resolve()} (write them with `cfx test -c configs/counterfactual/...`)"
        )
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path} is not an HDF5 file, so not a cfx result store")
    try:
        with h5py.File(path, "r", locking=False) as file:
            attributes = dict(file.attrs)
            datasets = {group: list(file[group]) for group in ("pairs", "images", "extras") if group in file}
    except (OSError, KeyError, RuntimeError) as error:
        raise ValueError(f"{path} is a truncated or corrupt HDF5 file ({type(error).__name__}: {error})") from error
    if attributes.get("format") != STORE_FORMAT:
        raise ValueError(f"{path} is an HDF5 file but not a cfx result store (no format attribute {STORE_FORMAT!r})")
    if attributes.get("version") != STORE_VERSION:
        raise ValueError(
            f"{path} is a cfx result store of version {attributes.get('version')}, expected {STORE_VERSION}"
        )
    try:
        attributes["metadata"] = json.loads(attributes["metadata"])
        attributes["columns"] = tuple(json.loads(attributes["columns"]))
        attributes["rows"] = int(attributes["rows"])
        attributes["finished"] = bool(attributes["finished"])
        attributes["extras"] = _decode_extra_fields(attributes["extras"]) if "extras" in attributes else None
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{path} is a corrupt cfx result store (its attributes: {error})") from error
    attributes["datasets"] = datasets
    return attributes


def _row_selection(rows: Rows, length: int) -> tuple[slice | np.ndarray, np.ndarray | None, bool]:
    """HDF5-readable rows (a step-1 slice, or increasing unique indices), the order restoring ``rows``, scalar-ness."""
    if rows is None:
        rows = slice(None)
    if isinstance(rows, slice):
        start, stop, step = rows.indices(length)
        if step == 1:
            return slice(start, max(start, stop)), None, False
        rows = np.arange(start, stop, step)
    scalar = isinstance(rows, int | np.integer) or (isinstance(rows, Tensor) and rows.ndim == 0)
    wanted = np.atleast_1d(np.asarray(rows.cpu() if isinstance(rows, Tensor) else rows, dtype=np.int64))
    if wanted.ndim != 1:
        raise ValueError(f"rows must be a slice, an integer or a 1-D sequence of integers, got shape {wanted.shape}")
    wanted = np.where(wanted < 0, wanted + length, wanted)
    if len(wanted) and (wanted.min() < 0 or wanted.max() >= length):
        raise IndexError(f"rows {rows} out of range for a store of {length} pairs")
    unique, inverse = np.unique(wanted, return_inverse=True)
    return unique, inverse, scalar


class Results:
    """A result store opened for reading (:func:`open_results`); nothing but the attributes is read up front.

    The store holds ``len(results)`` committed pairs; a finished store holds every pair of its run, sorted by
    ``(index, target)``, an unfinished one (a run still going, or killed) the pairs stored so far in the order
    they were written. The file is opened for each read and closed after it.

    Attributes:
        path: the store file.
        metadata: what made the results (a dict of plain values: ``explainer`` (class path and init arguments),
            ``task`` (the task's init arguments), ``seed``, ``global_seed``, ``cfx_version``, ``classifier``
            and ``gaussians`` (``{"path", "sha256"}`` or ``None``), ...; see
            ``cfx.tasks.CounterfactualTask.metadata``).
        columns: the per-pair record keys stored (``PAIR_SCHEMA`` order; optional entries such as ``nll`` only
            when measured).
        finished: the run completed and the store was sorted.
        image_keys: the image datasets stored: ``("originals", "counterfactuals")``, plus ``"path"`` when the
            explainer recorded one.
        extra_keys: names of the method-specific per-pair extras (an explainer's ``details``).
        extra_fields: the declared extras, ``{name: (dtype, per-pair shape)}`` (``None`` for an older store that
            declared none: its extras are the datasets it holds).
        encodings: image dataset name -> ``"uint8"`` (stored as ``k/255`` exactly) or ``"float16"``.
    """

    def __init__(self, path: str | Path):
        self.path = store_path(path)
        attributes = _read_attributes(self.path)
        self.metadata: dict[str, Any] = attributes["metadata"]
        self.columns: tuple[str, ...] = attributes["columns"]
        self.finished: bool = attributes["finished"]
        self._rows: int = attributes["rows"]
        datasets = attributes["datasets"]
        self.image_keys: tuple[str, ...] = tuple(
            key for key in (*IMAGE_KEYS, "path") if key in datasets.get("images", ())
        )
        self.extra_fields: dict[str, tuple[torch.dtype, tuple[int, ...]]] | None = attributes["extras"]
        declared = self.extra_fields
        self.extra_keys: tuple[str, ...] = tuple(datasets.get("extras", ()) if declared is None else declared)
        stored_columns = datasets.get("pairs", [])
        missing = [key for key in self.columns if key not in stored_columns]
        if self._rows and (missing or not set(IMAGE_KEYS) <= set(self.image_keys)):
            raise ValueError(f"{self.path} is a corrupt cfx result store: missing {missing or list(IMAGE_KEYS)}")
        self.encodings: dict[str, str] = {}
        self._cache: dict[str, Tensor] = {}
        with self._file() as file:
            for key in self.image_keys:
                self.encodings[key] = str(file["images"][key].attrs["encoding"])
            short = {
                f"{group}/{name}": len(file[group][name])
                for group in ("pairs", "images", "extras")
                if group in file
                for name in file[group]
                if len(file[group][name]) < self._rows
            }
        if short:
            raise ValueError(f"{self.path} is a corrupt cfx result store: {self._rows} rows committed, but {short}")

    def _file(self) -> h5py.File:
        try:
            return h5py.File(self.path, "r", locking=False)
        except OSError as error:
            raise ValueError(f"{self.path} is a truncated or corrupt HDF5 file ({error})") from error

    def __len__(self) -> int:
        """The number of committed pairs."""
        return self._rows

    def __repr__(self) -> str:
        state = "finished" if self.finished else "unfinished"
        return f"Results({str(self.path)!r}, {self._rows} pairs, {state}, method {self.method!r})"

    @property
    def method(self) -> str:
        """The explainer's class name (e.g. ``"DeDUCE"``)."""
        return str(self.metadata.get("explainer", {}).get("class_path", "?")).rsplit(".", 1)[-1]

    def __getitem__(self, key: str) -> Tensor:
        """A whole per-pair column (a record key, or an extra's name), read once and cached.

        Record keys come in their ``PAIR_SCHEMA`` dtype, ``(len(self),)``; extras ``(len(self), ...)`` as stored.

        Raises:
            KeyError: no such column (images are read with :meth:`images`).
        """
        if key not in self._cache:
            if key in self.columns:
                group, dtype = "pairs", PAIR_SCHEMA[key].dtype
            elif key in self.extra_keys:
                group, dtype = "extras", None
            else:
                raise KeyError(
                    f"{key!r} is not a per-pair column of {self.path}: columns {list(self.columns)}, extras "
                    f"{list(self.extra_keys)} (images: .images({list(self.image_keys)}))"
                )
            if self._rows == 0 and group == "pairs":
                self._cache[key] = empty_record([k for k in self.columns if PAIR_SCHEMA[k].optional])[key]
            else:
                with self._file() as file:
                    value = torch.from_numpy(np.asarray(file[group][key][: self._rows]))
                self._cache[key] = value if dtype is None else value.to(dtype)
        return self._cache[key]

    def record(self) -> dict[str, Tensor]:
        """The per-pair record (every stored column, schema order): what ``cfx.metrics.intersection_table`` takes."""
        return {key: self[key] for key in self.columns}

    def summary(self) -> dict[str, float]:
        """The metric table recomputed from the stored record (``_counterfactual_compute``; NaN: nothing to average)."""
        return {key: float(value) for key, value in _counterfactual_compute(self.record()).items()}

    def images(self, key: str = "counterfactuals", rows: Rows = None) -> Tensor:
        """Decoded float32 images of ``rows`` (all by default) of an image dataset, read on demand.

        Args:
            key: ``"originals"``, ``"counterfactuals"`` or ``"path"`` (see :attr:`image_keys`).
            rows: a slice, an index, or a sequence / tensor of indices (any order, repeats allowed).

        Returns:
            ``(n, C, H, W)`` (``(n, K, C, H, W)`` for ``path``) float32 in [0, 1]; without the row axis for a
            single integer index.
        """
        if key not in self.image_keys:
            raise KeyError(f"{self.path} stores the images {list(self.image_keys)}, not {key!r}")
        return self._read("images", key, rows, decode=self.encodings[key] == "uint8")

    def extra(self, key: str, rows: Rows = None) -> Tensor:
        """Rows of a method-specific per-pair extra (see :attr:`extra_keys`), read on demand, as stored."""
        if key not in self.extra_keys:
            raise KeyError(f"{self.path} stores the extras {list(self.extra_keys)}, not {key!r}")
        return self._read("extras", key, rows, decode=False)

    def _read(self, group: str, key: str, rows: Rows, decode: bool) -> Tensor:
        selection, inverse, scalar = _row_selection(rows, self._rows)
        with self._file() as file:
            dataset = file[group][key]
            if isinstance(selection, slice) or len(selection):
                value = np.asarray(dataset[selection])
            else:  # h5py reads no empty index list
                value = np.zeros((0, *dataset.shape[1:]), dtype=dataset.dtype)
        tensor = torch.from_numpy(value)
        if inverse is not None:
            tensor = tensor[torch.from_numpy(inverse.reshape(-1))]
        if group == "images":
            tensor = tensor.float().div_(255.0) if decode else tensor.float()
        return tensor[0] if scalar else tensor


def open_results(path: str | Path) -> Results:
    """Open the result store of a run: its folder (``output_dir``) or its ``results.h5``.

    Raises:
        FileNotFoundError: no store there.
        ValueError: the file is not HDF5, is truncated or corrupt, or is not a cfx result store.
    """
    return Results(path)


def metadata_differences(stored: Mapping[str, Any], current: Mapping[str, Any], ignore: Iterable[str] = ()) -> list:
    """The dotted keys (``task.max_queries``, ``classifier.sha256``, ...) where two metadata dicts differ.

    Args:
        stored: the store's metadata.
        current: the metadata of the run about to use the store.
        ignore: dotted keys (and their sub-keys) that may differ.
    """
    ignored = tuple(ignore)

    def flat(value: Any, prefix: str) -> dict[str, Any]:
        if isinstance(value, Mapping) and value:
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
        return {prefix[:-1]: value}

    left, right = flat(json.loads(json.dumps(stored)), ""), flat(json.loads(json.dumps(current)), "")
    keys = sorted(set(left) | set(right))
    return [
        key
        for key in keys
        if left.get(key, "<absent>") != right.get(key, "<absent>")
        and not any(key == name or key.startswith(f"{name}.") for name in ignored)
    ]


def _exact_uint8(images: Tensor) -> np.ndarray | None:
    """``images`` as uint8 ``k`` when every value is exactly ``k / 255`` (decoding gives them back), else ``None``."""
    levels = (images.detach().float() * 255).round_().clamp_(0, 255).to(torch.uint8)
    return levels.numpy() if torch.equal(levels.float().div_(255.0), images.detach().cpu()) else None


class StoreWriter:
    """Appends batches of pairs to a result store (one writer per process: each writes its own file).

    :meth:`create` makes an empty store, :meth:`resume` continues an existing one (pairs beyond its committed
    rows, from a batch a kill interrupted, are dropped). Each :meth:`append` opens the file, writes the batch,
    flushes, then raises the committed ``rows`` and closes it.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        attributes = _read_attributes(self.path)
        self.columns: tuple[str, ...] = attributes["columns"]
        self.extra_fields: dict[str, tuple[torch.dtype, tuple[int, ...]]] | None = attributes["extras"]
        self.rows: int = attributes["rows"]

    @classmethod
    def create(
        cls,
        path: str | Path,
        metadata: Mapping[str, Any],
        columns: Sequence[str],
        extras: ExtraFields | None = None,
    ) -> StoreWriter:
        """Write an empty store (atomically) with the run's ``metadata``, record ``columns`` and extras, and open it.

        Args:
            path: the store file.
            metadata: what made the results (plain values).
            columns: the per-pair record keys, in ``PAIR_SCHEMA`` order.
            extras: the per-pair extras every batch must give, ``{name: (dtype, per-pair shape)}`` (an explainer's
                ``detail_fields()``); ``None`` declares none and lets the first batch decide (older behaviour).
        """
        unknown = sorted(set(columns) - set(PAIR_SCHEMA))
        if unknown:
            raise ValueError(f"store columns must be PAIR_SCHEMA entries {list(PAIR_SCHEMA)}, got {unknown}")
        if tuple(columns) != record_keys([key for key in columns if PAIR_SCHEMA[key].optional]):
            raise ValueError(f"store columns must be record keys in schema order, got {list(columns)}")
        with atomic_path(path) as temporary:
            with h5py.File(temporary, "w") as file:
                file.attrs.update(
                    format=STORE_FORMAT,
                    version=STORE_VERSION,
                    metadata=json.dumps(metadata, allow_nan=False),
                    columns=json.dumps(list(columns)),
                    rows=0,
                    finished=False,
                )
                if extras is not None:
                    file.attrs["extras"] = _encode_extra_fields(extras)
                    group = file.create_group("extras")
                    for name, (dtype, shape) in extras.items():
                        empty = torch.zeros(0, *shape, dtype=dtype).numpy()
                        _create_dataset(group, name, empty, rows=0)
        return cls(path)

    @classmethod
    def resume(cls, path: str | Path) -> StoreWriter:
        """Open an existing store for appending; rows a kill left uncommitted are cut off."""
        writer = cls(path)
        with h5py.File(writer.path, "a") as file:
            for group in ("pairs", "images", "extras"):
                for dataset in file.get(group, {}).values():
                    dataset.resize(writer.rows, axis=0)
        return writer

    def append(
        self, record: Mapping[str, Tensor], images: Mapping[str, Tensor], extras: Mapping[str, Tensor] | None = None
    ) -> None:
        """Store a batch of ``P`` pairs and commit it.

        Args:
            record: the batch's record (``measure_pairs``), exactly the store's columns.
            images: ``originals`` and ``counterfactuals`` ``(P, C, H, W)``, optionally ``path`` ``(P, K, C, H, W)``.
            extras: further per-pair tensors ``(P, ...)``, e.g. a method's latent codes: one dataset each.

        Raises:
            ValueError: the record's keys are not the store's columns, a tensor has not ``P`` rows, or the extras
                are not the declared ones (names, dtypes, per-pair shapes).
        """
        size = check_record(record)
        if self.extra_fields is not None:
            self._check_extras(dict(extras or {}))
        if tuple(key for key in record if key in PAIR_SCHEMA) != self.columns:
            raise ValueError(f"{self.path} stores the record entries {list(self.columns)}, got {list(record)}")
        groups = {
            "pairs": {key: record[key].detach().cpu().numpy() for key in self.columns},
            "images": dict(images),
            "extras": dict(extras or {}),
        }
        lengths = {key: len(value) for group in ("images", "extras") for key, value in groups[group].items()}
        if any(length != size for length in lengths.values()) or not set(IMAGE_KEYS) <= set(images):
            raise ValueError(f"expected {list(IMAGE_KEYS)} (+ path, extras) of {size} rows each, got {lengths}")
        with h5py.File(self.path, "a") as file:
            stored = {group: set(file.get(group, {})) for group in ("images", "extras")}
            given = {group: set(groups[group]) for group in ("images", "extras")}
            if self.rows and stored != given:
                raise ValueError(
                    f"{self.path} stores the images and extras {stored}; every batch must give the same, got {given}"
                )
            file.attrs["finished"] = False
            for group, values in groups.items():
                for key, value in values.items():
                    self._append_dataset(file.require_group(group), key, value, group == "images")
            file.flush()  # the data first ...
            self.rows += size
            file.attrs["rows"] = self.rows  # ... then the count that makes readers trust it
            file.flush()

    def _check_extras(self, extras: dict[str, Tensor]) -> None:
        if set(extras) != set(self.extra_fields):
            raise ValueError(f"{self.path} stores the extras {sorted(self.extra_fields)}, got {sorted(extras)}")
        for name, (dtype, shape) in self.extra_fields.items():
            value = extras[name]
            if not isinstance(value, Tensor) or value.dtype != dtype or tuple(value.shape[1:]) != shape:
                got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{self.path} stores the extra {name!r} as {dtype} (P, {shape}), got {got}")

    def _append_dataset(self, group: h5py.Group, key: str, value: Tensor | np.ndarray, image: bool) -> None:
        if isinstance(value, Tensor):
            value = value.detach().cpu()
            encoded = _exact_uint8(value) if image else None
            if image and encoded is None:
                encoded = value.to(torch.float16).numpy()
            value = encoded if image else value.numpy()
        if key not in group:
            _create_dataset(group, key, value, self.rows)
            if image:
                group[key].attrs["encoding"] = "uint8" if value.dtype == np.uint8 else "float16"
        dataset = group[key]
        if dataset.shape[1:] != value.shape[1:]:
            raise ValueError(
                f"{self.path}: {group.name}/{key} holds rows of shape {dataset.shape[1:]}, got {value.shape}"
            )
        if image and dataset.dtype == np.uint8 and value.dtype != np.uint8:  # an inexact batch: float16 from now on
            self._migrate_to_float16(group, key)
            dataset = group[key]
        if image and dataset.dtype != np.uint8 and value.dtype == np.uint8:
            value = (value.astype(np.float32) / np.float32(255.0)).astype(np.float16)
        dataset.resize(self.rows + len(value), axis=0)
        dataset[self.rows :] = value

    def _migrate_to_float16(self, group: h5py.Group, key: str) -> None:
        """Re-encode a uint8 image dataset as float16 (piece by piece), under the same name."""
        old = group[key]
        new = group.create_dataset(
            f"{key}.float16",
            shape=old.shape,
            maxshape=old.maxshape,
            dtype=np.float16,
            chunks=old.chunks,
            compression="gzip",
            compression_opts=4,
            shuffle=True,
        )
        step = max(1, _COPY_ROWS_BYTES // max(1, old[0:1].nbytes * 4))
        for start in range(0, self.rows, step):
            stop = min(self.rows, start + step)
            new[start:stop] = (old[start:stop].astype(np.float32) / np.float32(255.0)).astype(np.float16)
        new.attrs["encoding"] = "float16"
        group.file.flush()
        del group[key]
        group.move(f"{key}.float16", key)


def _create_dataset(group: h5py.Group, key: str, value: np.ndarray, rows: int) -> None:
    """A resizable, chunked, compressed dataset of ``rows`` rows shaped and typed like ``value``'s rows."""
    row_bytes = max(1, int(np.prod(value.shape[1:], dtype=np.int64)) * value.dtype.itemsize)
    group.create_dataset(
        key,
        shape=(rows, *value.shape[1:]),
        maxshape=(None, *value.shape[1:]),
        dtype=value.dtype,
        chunks=(max(1, min(4096, _CHUNK_BYTES // row_bytes)), *value.shape[1:]),
        compression="gzip",
        compression_opts=4,
        shuffle=value.dtype.itemsize > 1,
    )


def finish_store(path: str | Path) -> None:
    """Mark a store finished (its rows are complete and sorted by ``(index, target)``)."""
    with h5py.File(path, "a") as file:
        file.attrs["finished"] = True


def is_sorted(results: Results) -> bool:
    """Whether the store's pairs are strictly increasing in ``(index, target)``."""
    index, target = results["index"], results["target"]
    return bool(((index[1:] > index[:-1]) | ((index[1:] == index[:-1]) & (target[1:] > target[:-1]))).all())


def merge_stores(sources: Sequence[Results], destination: str | Path, metadata: Mapping[str, Any]) -> Results:
    """Write the pairs of ``sources`` into one finished store sorted by ``(index, target)``, atomically.

    The images are copied in pieces, so memory stays bounded by the per-pair columns plus one piece. The
    sources must not share a pair.

    Returns:
        The merged store, opened for reading.

    Raises:
        ValueError: the sources store different columns, images or extras, or share a pair.
    """
    declared = {json.dumps({k: str(v) for k, v in (s.extra_fields or {}).items()}) for s in sources}
    if len({(s.columns, s.image_keys, s.extra_keys) for s in sources if len(s)}) > 1 or len(declared) > 1:
        raise ValueError(
            "cannot merge stores with different columns, images or extras: "
            + ", ".join(f"{s.path}: {s.columns} {s.image_keys} {s.extra_fields or s.extra_keys}" for s in sources)
        )
    filled = [source for source in sources if len(source)] or list(sources[:1])
    columns = filled[0].columns if filled else ()
    index = torch.cat([source["index"] for source in filled]) if filled else torch.zeros(0, dtype=torch.long)
    target = torch.cat([source["target"] for source in filled]) if filled else torch.zeros(0, dtype=torch.long)
    origin = torch.cat([torch.full((len(s),), n) for n, s in enumerate(filled)]) if filled else torch.zeros(0)
    row = torch.cat([torch.arange(len(s)) for s in filled]) if filled else torch.zeros(0, dtype=torch.long)
    order = torch.argsort(target, stable=True)
    order = order[torch.argsort(index[order], stable=True)]
    keys = index[order] * (1 + int(target.max()) if len(target) else 1) + target[order]
    if len(keys) > 1 and (keys[1:] == keys[:-1]).any():
        duplicate = int((keys[1:] == keys[:-1]).nonzero()[0])
        raise ValueError(
            f"the stores {[str(s.path) for s in filled]} share the pair (index, target) = "
            f"({int(index[order][duplicate])}, {int(target[order][duplicate])})"
        )
    origin, row = origin[order], row[order]
    destination = Path(destination)
    with atomic_path(destination) as temporary:
        writer = StoreWriter.create(temporary, metadata, columns, filled[0].extra_fields if filled else None)
        images_per_row = sum(
            int(np.prod(filled[0].images(key, slice(0, 1)).shape)) for key in filled[0].image_keys if len(filled[0])
        )
        step = max(1, _COPY_ROWS_BYTES // max(1, 4 * images_per_row))
        for start in range(0, len(order), step):
            pieces = [(n, row[start : start + step][origin[start : start + step] == n]) for n in range(len(filled))]
            position = torch.cat([torch.nonzero(origin[start : start + step] == n).squeeze(1) for n, _ in pieces])
            restore = torch.argsort(position)

            def gather(read, pieces=pieces, restore=restore) -> Tensor:
                return torch.cat([read(filled[n], rows) for n, rows in pieces if len(rows)])[restore]

            record = {key: gather(lambda s, r, key=key: s[key][r]) for key in columns}
            images = {key: gather(lambda s, r, key=key: s.images(key, r)) for key in filled[0].image_keys}
            extras = {key: gather(lambda s, r, key=key: s.extra(key, r)) for key in filled[0].extra_keys}
            writer.append(record, images, extras)
        finish_store(temporary)
    return open_results(destination)


def strict_json_summary(summary: Mapping[str, float]) -> dict[str, float | None]:
    """``summary`` with NaN (nothing to average) as ``None``, for strict JSON."""
    return {name: value if math.isfinite(value) else None for name, value in summary.items()}
