"""Corpora read through Hugging Face ``datasets`` from local files only, never the hub.

Sources (``data.source``):

- ``hf-disk:DIR``: a folder written by ``Dataset.save_to_disk`` or
  ``DatasetDict.save_to_disk`` (then ``data.split`` picks the split, ``train`` by default);
- ``hf-parquet:PATH``, ``hf-json:PATH``, ``hf-text:PATH``: one file or a glob (``**``
  recursive) of local files, matched files sorted by path and loaded with
  ``datasets.load_dataset("parquet" | "json" | "text", data_files=[...])``. ``hf-text``
  reads one document per file (``sample_by="document"``; the text builder turns
  ``\\r\\n`` into ``\\n``); the others one document per row.

The documents are the string column ``data.text_field`` (``text`` by default) in row
order, empty strings left out, as UTF-8 bytes: the same documents as a ``.jsonl`` source
with the same texts, so the same token stream, cache key and batch order.

``datasets`` runs with ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1`` and a
throw-away cache folder inside ``data.cache_dir`` (``load_dataset`` converts files to
Arrow there; it is deleted after the read, so an edited file is never served stale from
it and nothing lands in ``~/.cache``). ``datasets`` is an optional dependency: the extra
``hf`` (``pip install -e '.[hf]'``).

Imports neither jax nor torch (``datasets`` itself only when such a source is read).
"""

from __future__ import annotations

import contextlib
import glob as _glob
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmspec.config import DataConfig
from lmspec.errors import UserError, UserFileNotFoundError

# data.source prefix -> datasets' packaged builder (None: load_from_disk)
HF_KINDS = {"hf-disk": None, "hf-parquet": "parquet", "hf-json": "json", "hf-text": "text"}
INSTALL_HINT = ("pip install -e '.[hf]' in a checkout (the project's optional extra 'hf'), "
                "or pip install datasets")
_ROWS_PER_BATCH = 4096


@contextlib.contextmanager
def _offline(source: str, progress: bool) -> Iterator[Any]:
    """The ``datasets`` module, imported and used with the hub switched off, its
    progress bars shown only when ``progress`` and its log quiet (a file it cannot read
    becomes a :class:`UserError` quoting its message); the environment and ``datasets``'
    settings are restored afterwards. A :class:`UserError` naming the extra to install
    when it is missing.

    ``datasets`` and ``huggingface_hub`` read the variables when first imported; their
    module constants are set as well, for when they were imported earlier."""
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    patched: list[tuple[Any, str, Any]] = []
    bars_were_off: bool | None = None
    verbosity: int | None = None
    datasets: Any = None
    try:
        try:
            import datasets
            import huggingface_hub.constants as hub_constants
        except ImportError as e:
            raise UserError(f"data.source={source!r} needs the 'datasets' package, which "
                            f"is not installed ({e}); {INSTALL_HINT}") from None
        for module, name in ((datasets.config, "HF_HUB_OFFLINE"),
                             (datasets.config, "HF_DATASETS_OFFLINE"),
                             (hub_constants, "HF_HUB_OFFLINE")):
            if hasattr(module, name):
                patched.append((module, name, getattr(module, name)))
                setattr(module, name, True)
        verbosity = datasets.utils.logging.get_verbosity()
        datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)
        bars_were_off = datasets.utils.are_progress_bars_disabled()
        if progress:
            datasets.utils.enable_progress_bars()
        else:
            datasets.utils.disable_progress_bars()
        yield datasets
    finally:
        if verbosity is not None:
            datasets.utils.logging.set_verbosity(verbosity)
        if bars_were_off is not None:
            if bars_were_off:
                datasets.utils.disable_progress_bars()
            else:
                datasets.utils.enable_progress_bars()
        for module, name, value in reversed(patched):
            setattr(module, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _matched_files(loc: str, source: str, cache_dir: Path) -> list[Path]:
    """The files ``loc`` names (a file or a glob), sorted by path, without the token
    cache."""
    if any(c in loc for c in "*?["):
        files = sorted(Path(p) for p in _glob.glob(loc, recursive=True) if Path(p).is_file())
        cache = cache_dir.resolve()
        files = [p for p in files if not p.resolve().is_relative_to(cache)]
        if not files:
            raise UserFileNotFoundError(f"data.source={source!r}: the pattern matches no files")
        return files
    p = Path(loc)
    if p.is_dir():
        raise UserError(f"data.source={source!r}: {p} is a folder; name its files with a "
                        f"glob, e.g. {p / '*'}")
    if not p.is_file():
        raise UserFileNotFoundError(f"data.source={source!r}: no such file {p}")
    return [p]


def _split_of_saved(datasets: Any, root: Path, data: DataConfig) -> Any:
    """The ``datasets.Dataset`` saved in ``root`` (its ``data.split`` for a DatasetDict)."""
    src = data.source
    is_dict = (root / "dataset_dict.json").is_file()
    if not is_dict and not ((root / "state.json").is_file()
                            and (root / "dataset_info.json").is_file()):
        raise UserError(
            f"data.source={src!r}: {root} is not a dataset saved with save_to_disk (it has "
            "neither dataset_dict.json nor state.json + dataset_info.json); for parquet, "
            "json or text files use hf-parquet:, hf-json: or hf-text: with a glob"
        )
    try:
        loaded = datasets.load_from_disk(str(root))
    except (OSError, ValueError, KeyError, datasets.exceptions.DatasetsError) as e:
        raise UserError(f"data.source={src!r}: cannot load the dataset saved in {root} "
                        f"({_first_line(e)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if data.split not in loaded:
            raise UserError(f"data.source={src!r}: no split data.split={data.split!r}; the "
                            f"splits are {sorted(loaded)}")
        return loaded[data.split]
    if data.split != "train":
        raise UserError(f"data.source={src!r}: {root} holds one Dataset, not a DatasetDict; "
                        f"it has no splits (leave data.split at 'train', not "
                        f"{data.split!r})")
    return loaded


def _loaded_files(datasets: Any, builder: str, files: list[Path], data: DataConfig,
                  tmp: str) -> Any:
    kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=[str(p) for p in files],
                                     split=data.split, cache_dir=tmp, **kwargs)
    except ValueError as e:
        if "Unknown split" in str(e):
            raise UserError(f"data.source={data.source!r}: no split data.split="
                            f"{data.split!r}; files loaded this way have only the split "
                            "'train'") from None
        raise UserError(f"data.source={data.source!r}: datasets' {builder} builder cannot "
                        f"read {len(files)} file(s) ({_first_line(e)})") from None
    except (OSError, UnicodeDecodeError, datasets.exceptions.DatasetsError) as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        raise UserError(f"data.source={data.source!r}: datasets' {builder} builder cannot "
                        f"read {len(files)} file(s) ({_first_line(cause)})") from None


def _documents(datasets: Any, ds: Any, data: DataConfig, where: str) -> list[bytes]:
    """The non-empty strings of column ``data.text_field`` in row order, as UTF-8, until
    ``data.max_bytes`` (> 0) bytes are read."""
    field = data.text_field
    src = data.source
    if field not in ds.column_names:
        raise UserError(f"data.source={src!r}: {where} has no column data.text_field="
                        f"{field!r}; its columns are {list(ds.column_names)}")
    feature = ds.features[field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise UserError(f"data.source={src!r}: column {field!r} of {where} holds {feature}, "
                        "not strings; choose a string column with data.text_field")
    docs: list[bytes] = []
    total = 0
    row = 0
    for table in ds.select_columns([field]).with_format("arrow").iter(_ROWS_PER_BATCH):
        for value in table.column(field).to_pylist():
            if value is None:
                raise UserError(f"data.source={src!r}: row {row} of column {field!r} of "
                                f"{where} is null (missing); fill or drop such rows")
            row += 1
            if value:
                d = value.encode("utf-8")
                docs.append(d)
                total += len(d)
                if 0 < data.max_bytes <= total:
                    return docs
    return docs


def read_hf(kind: str, loc: str, data: DataConfig, progress: bool) -> list[bytes]:
    """Documents of an ``hf-*`` source (see the module docstring)."""
    src = data.source
    cache_dir = Path(data.cache_dir)
    if kind == "hf-disk":
        root = Path(loc)
        if not root.is_dir():
            raise UserFileNotFoundError(f"data.source={src!r}: no such folder {root}")
        with _offline(src, progress) as datasets:
            ds = _split_of_saved(datasets, root, data)
            where = str(root) + (f" (split {data.split!r})"
                                 if (root / "dataset_dict.json").is_file() else "")
            return _documents(datasets, ds, data, where)
    builder = HF_KINDS[kind]
    assert builder is not None
    files = _matched_files(loc, src, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _offline(src, progress) as datasets, \
            tempfile.TemporaryDirectory(prefix=".hf-datasets-", dir=cache_dir) as tmp:
        ds = _loaded_files(datasets, builder, files, data, tmp)
        where = f"{len(files)} {builder} file(s)" if len(files) > 1 else str(files[0])
        docs = _documents(datasets, ds, data, where)
        del ds  # its Arrow files live in tmp
        return docs
