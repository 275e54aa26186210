"""Public CTR datasets as SampleBatch streams: Criteo, Avazu, MovieLens, mapped CSV.

:func:`open_dataset` picks the adapter (by ``format`` or from the file) and returns a
:class:`Dataset`; ``dataset.batches(batch_rows)`` yields batches in file order. The
slot mapping of each format is documented in ``docs/datasets.md``.
"""

from __future__ import annotations

import csv
import inspect
from pathlib import Path
from typing import Any

from pipeline.ingest.adapters.avazu import AVAZU_REQUIRED, AvazuDataset
from pipeline.ingest.adapters.base import Dataset, DatasetError, OnError, Row, open_text
from pipeline.ingest.adapters.criteo import CriteoDataset
from pipeline.ingest.adapters.csvmap import CsvDataset, CsvMapping, load_mapping
from pipeline.ingest.adapters.movielens import MovieLensDataset

__all__ = [
    "FORMATS",
    "AvazuDataset",
    "CriteoDataset",
    "CsvDataset",
    "CsvMapping",
    "Dataset",
    "DatasetError",
    "MovieLensDataset",
    "Row",
    "detect_format",
    "load_mapping",
    "open_dataset",
]

#: Format name -> adapter class.
FORMATS: dict[str, type[Dataset]] = {
    "criteo": CriteoDataset,
    "avazu": AvazuDataset,
    "movielens": MovieLensDataset,
    "csv": CsvDataset,
}


def detect_format(source: Path) -> str:
    """Guess the format of ``source`` from its name and first line, or DatasetError.

    A folder or a file named ``ratings.*`` is MovieLens; a first line of 40 tab-separated
    fields is Criteo; a CSV header with ``id``, ``click`` and ``hour`` is Avazu. Anything
    else needs an explicit format, or a mapping file for the generic CSV adapter.
    """
    if source.is_dir() or source.name.split(".")[0] == "ratings":
        return "movielens"
    if not source.is_file():
        raise DatasetError("no such file or folder", path=source)
    with open_text(source) as f:
        try:
            first = next((line for line in f if line.strip()), "")
        except UnicodeDecodeError:
            first = ""
    if first.count("\t") == 39:
        return "criteo"
    header = {c.strip() for c in next(csv.reader([first]), [])}
    if header.issuperset(AVAZU_REQUIRED):
        return "avazu"
    raise DatasetError(
        f"cannot tell the dataset format; pass one of {', '.join(FORMATS)} "
        "(or a YAML mapping for a generic CSV)",
        path=source,
    )


def open_dataset(
    source: str | Path,
    format: str | None = None,
    mapping: Path | None = None,
    *,
    on_error: OnError = "raise",
    **options: Any,
) -> Dataset:
    """The dataset at ``source`` (a file, or a MovieLens folder).

    ``format`` is one of :data:`FORMATS` (detected when None; a ``mapping`` implies
    ``csv``). ``options`` go to the adapter (e.g. ``base_time_ms`` for Criteo,
    ``threshold`` for MovieLens); an option the adapter does not take is an error.
    """
    path = Path(source)
    if format is None:
        format = "csv" if mapping is not None else detect_format(path)
    if format not in FORMATS:
        expected = ", ".join(FORMATS)
        raise DatasetError(f"unknown dataset format {format!r}; expected one of {expected}")
    if (format == "csv") != (mapping is not None):
        raise DatasetError(
            "a mapping file is required for format 'csv'"
            if format == "csv"
            else f"a mapping file applies only to format 'csv', not {format!r}"
        )
    cls = FORMATS[format]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "path", "source"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        allowed = ", ".join(sorted(accepted - {"mapping", "on_error"})) or "none"
        raise DatasetError(
            f"format {format!r} does not take option(s) {', '.join(unknown)} (takes: {allowed})"
        )
    if mapping is not None:
        return CsvDataset(path, Path(mapping), on_error=on_error, **options)
    if format == "criteo":
        return CriteoDataset(path, on_error=on_error, **options)
    if format == "avazu":
        return AvazuDataset(path, on_error=on_error, **options)
    return MovieLensDataset(path, on_error=on_error, **options)
