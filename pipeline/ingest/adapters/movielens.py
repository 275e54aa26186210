"""MovieLens ratings as click samples: rating >= threshold is a click.

Reads ``ratings.dat`` (ML-1M/10M: ``UserID::MovieID::Rating::Timestamp``) or
``ratings.csv`` (ml-latest/20M/25M, header ``userId,movieId,rating,timestamp``), and
joins the optional ``movies.dat``/``movies.csv`` (genres, ``|``-separated, one id
each) and ``users.dat`` (gender, age, occupation) found next to it. The timestamp
(seconds) becomes the event time in ms. Ratings files are grouped by user, not sorted
by time; ``sort_by_time=True`` loads the whole file and replays it in time order.
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Generator, Iterator, Sequence
from itertools import islice
from pathlib import Path

import numpy as np

from pipeline.codec import SampleBatch, SlotConfig
from pipeline.ingest.adapters.base import (
    Dataset,
    DatasetError,
    OnError,
    check_file,
    float_column,
    hash_multi,
    hash_single,
    make_batch,
    open_text,
)

__all__ = ["MOVIE_SLOTS", "USER_SLOTS", "MovieLensDataset", "find_ratings"]

MOVIE_SLOTS = ("user_id", "movie_id", "genres")
USER_SLOTS = ("gender", "age", "occupation")
_NO_GENRES = "(no genres listed)"
_DAT_ENCODING = "latin-1"  # the .dat files of ML-1M/10M are not UTF-8


def find_ratings(source: Path) -> Path:
    """The ratings file of ``source`` (the file itself, or the one in a folder)."""
    if source.is_dir():
        for name in ("ratings.dat", "ratings.csv", "ratings.dat.gz", "ratings.csv.gz"):
            if (source / name).is_file():
                return source / name
        raise DatasetError("no ratings.dat or ratings.csv in this folder", path=source)
    return check_file(source)


def _sibling(folder: Path, stem: str) -> Path | None:
    """``folder/stem.dat`` or ``.csv`` (plain or .gz) when present."""
    for suffix in (".dat", ".csv", ".dat.gz", ".csv.gz"):
        if (folder / (stem + suffix)).is_file():
            return folder / (stem + suffix)
    return None


def _is_dat(path: Path) -> bool:
    return path.name.removesuffix(".gz").endswith(".dat")


class MovieLensDataset(Dataset):
    """MovieLens ratings joined with movies/users as SampleBatch (no dense features)."""

    def __init__(
        self,
        source: str | Path,
        *,
        on_error: OnError = "raise",
        threshold: float = 4.0,
        sort_by_time: bool = False,
        movies: Path | None = None,
        users: Path | None = None,
    ) -> None:
        self.path = find_ratings(Path(source))
        self.threshold = float(threshold)
        self.sort_by_time = bool(sort_by_time)
        folder = self.path.parent
        self.movies_path = check_file(movies) if movies else _sibling(folder, "movies")
        self.users_path = check_file(users) if users else _sibling(folder, "users")
        slots = MOVIE_SLOTS + (USER_SLOTS if self.users_path else ())
        super().__init__(f"movielens:{self.path.name}", SlotConfig(slots, 0), on_error)
        #: Malformed lines skipped in the movies/users files (read once, here).
        self.side_skipped = 0
        self.genres: dict[str, str] = {}
        self.users: dict[str, tuple[str, str, str]] = {}
        if self.movies_path:
            for fields in self._side_rows(self.movies_path, 3, "movieId"):
                genres = fields[2]
                self.genres[fields[0]] = "" if genres == _NO_GENRES else genres
        if self.users_path:
            for fields in self._side_rows(self.users_path, 5, "userId"):
                self.users[fields[0]] = (fields[1], fields[2], fields[3])

    def _side_rows(self, path: Path, width: int, header_first: str) -> Iterator[list[str]]:
        """Rows of a movies/users file; a bad line raises or is counted in ``side_skipped``."""
        for rows, lines in self._read(path, 1 << 16, header_first):
            for fields, line in zip(rows, lines, strict=True):
                if len(fields) == width and fields[0]:
                    yield fields
                    continue
                why = f"expected {width} fields, got {len(fields)}"
                err = DatasetError(why, path=path, line=line)
                if self.on_error == "raise":
                    raise err
                self.side_skipped += 1

    def _read(
        self, path: Path, chunk_rows: int, header_first: str
    ) -> Iterator[tuple[list[list[str]], list[int]]]:
        """(split rows, line numbers) chunks of a ``::`` .dat file or a CSV with a header."""
        if _is_dat(path):
            with open_text(path, _DAT_ENCODING) as f:
                line = 0
                while raw := list(islice(f, chunk_rows)):
                    rows, lines = [], []
                    for text in raw:
                        line += 1
                        if text.strip():
                            rows.append(text.rstrip("\r\n").split("::"))
                            lines.append(line)
                    yield rows, lines
            return
        with open_text(path) as f:
            reader = csv.reader(f)
            header = next(reader, [])
            if not header or header[0].strip() != header_first:
                raise DatasetError(f"expected a header starting with {header_first}", path=path)
            while True:
                rows, lines = [], []
                for row in islice(reader, chunk_rows):
                    if row:
                        rows.append(row)
                        lines.append(reader.line_num)
                if not rows:
                    return
                yield rows, lines

    def _blocks(self, chunk_rows: int) -> Generator[SampleBatch, None, None]:
        chunks = self._read(self.path, chunk_rows, "userId")
        if self.sort_by_time:
            chunks = self._time_sorted(chunks, chunk_rows)
        for rows, lines in chunks:
            block = self._parse(rows, lines)
            if block is not None:
                yield block

    @staticmethod
    def _time_sorted(
        chunks: Iterator[tuple[list[list[str]], list[int]]], chunk_rows: int
    ) -> Iterator[tuple[list[list[str]], list[int]]]:
        """All rows re-chunked in timestamp order (stable; unparsable times sort first)."""
        rows: list[list[str]] = []
        lines: list[int] = []
        for chunk, numbers in chunks:
            rows.extend(chunk)
            lines.extend(numbers)
        keys = np.full(len(rows), -np.inf)
        for i, row in enumerate(rows):
            with contextlib.suppress(ValueError):  # _parse rejects it, naming the line
                keys[i] = float(row[3]) if len(row) == 4 else -np.inf
        order = np.argsort(np.nan_to_num(keys, nan=-np.inf), kind="stable")
        for start in range(0, len(order), chunk_rows):
            idx = order[start : start + chunk_rows].tolist()
            yield [rows[i] for i in idx], [lines[i] for i in idx]

    def _parse(self, rows: list[list[str]], lines: list[int]) -> SampleBatch | None:
        """One chunk of rating rows -> a block (None when every row was skipped)."""
        errors = {i: f"expected 4 fields, got {len(r)}" for i, r in enumerate(rows) if len(r) != 4}
        rows, lines = self._drop(errors, rows, lines, self.path)
        if not rows:
            return None
        cols: list[Sequence[str]] = list(zip(*rows, strict=True))
        ratings, _, errors = float_column(cols[2], "rating", missing_ok=False)
        stamps, _, bad = float_column(cols[3], "timestamp", missing_ok=False)
        for i, why in bad.items():
            errors.setdefault(i, why)
        for i, (u, m) in enumerate(zip(cols[0], cols[1], strict=True)):
            if not u or not m:
                errors.setdefault(i, "empty user or movie id")
        if errors:
            keep = self._reject(errors, lines, self.path)
            if not keep.any():
                return None
            idx = np.flatnonzero(keep).tolist()
            cols = [[c[i] for i in idx] for c in cols]
            ratings, stamps = ratings[keep], stamps[keep]
        users, movies = cols[0], cols[1]
        slot_ids = [
            hash_single("user_id", users),
            hash_single("movie_id", movies),
            hash_multi("genres", [self.genres.get(m, "") for m in movies], "|"),
        ]
        if self.users_path:
            info = [self.users.get(u, ("", "", "")) for u in users]
            for k, slot in enumerate(USER_SLOTS):
                slot_ids.append(hash_single(slot, [x[k] for x in info]))
        labels = (ratings >= self.threshold).astype(np.float32)
        times = np.round(stamps * 1000.0).astype(np.int64)
        return make_batch(self.config, labels, times, slot_ids)
