"""Tabular data files read through `datasets`: JSONL, JSON, CSV, Parquet or a saved dataset.

The formats a site's records come in (FlowerTune's and FATE-LLM's `datasets`-based loaders take
the same); the rows are parsed by the caller (questions, instructions), which names the file and
the row in its errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedcollm.data.errors import DataError

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TABLE_FORMATS = ".jsonl, .jsonl.gz, .json, .csv, .parquet or a datasets.save_to_disk folder"


def read_rows(path: Path) -> Any:
    """The file's rows as a `datasets.Dataset` (a saved dataset folder, or a file by suffix).

    Raises `DataError` naming the path for a missing file, an unknown format, a folder holding
    several splits, or a file `datasets` cannot parse.
    """
    import datasets

    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                raise DataError(f"{path} holds several splits ({', '.join(loaded)}); point at one of them")
            return loaded
        suffix = ".jsonl" if path.name.endswith(".jsonl.gz") else path.suffix
        builder = _BUILDERS.get(suffix)
        if builder is None:
            raise DataError(
                f"data file {path}: unknown format {suffix or '(no suffix)'}; use {TABLE_FORMATS}"
            )
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except DataError:
        raise
    except Exception as exc:  # pyarrow's and datasets' parse errors have no common base
        raise DataError(f"data file {path} cannot be read: {type(exc).__name__}: {exc}") from None
