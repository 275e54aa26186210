"""Dataset adapters: exact ids, dense transforms, event times, labels, bad rows, real samples."""

from __future__ import annotations

import gzip
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.codec import SampleBatch, hash64
from pipeline.codec.samplebatch import concat
from pipeline.ingest.adapters import (
    AvazuDataset,
    CriteoDataset,
    CsvDataset,
    DatasetError,
    MovieLensDataset,
    detect_format,
    open_dataset,
)
from pipeline.ingest.adapters.base import hash_strs
from pipeline.ingest.adapters.criteo import DEFAULT_BASE_TIME_MS, DEFAULT_STEP_MS

pytestmark = pytest.mark.unit


def ids_of(batch: SampleBatch, row: int) -> dict[str, list[int]]:
    return {slot: ids.tolist() for slot, ids in batch.row_features(row).items()}


def read_all(dataset: object, batch_rows: int = 1024) -> SampleBatch:
    return concat(list(dataset.batches(batch_rows)))  # type: ignore[attr-defined]


# -- Criteo ------------------------------------------------------------------------------


def criteo_line(label: str, ints: list[str], cats: list[str]) -> str:
    assert len(ints) == 13 and len(cats) == 26
    return "\t".join([label, *ints, *cats]) + "\n"


INTS_A = ["5", "-3", "", "0", "1382", "4", "15", "2", "181", "1", "2", "", "2"]
CATS_A = [f"{k:08x}" for k in range(26)]
CATS_A[4] = ""  # C5 missing
INTS_B = ["0"] * 13
CATS_B = [f"b{k}" for k in range(26)]


@pytest.fixture
def criteo_file(tmp_path: Path) -> Path:
    path = tmp_path / "day.tsv"
    path.write_text(criteo_line("1", INTS_A, CATS_A) + criteo_line("0", INTS_B, CATS_B))
    return path


def test_criteo_ids_dense_times_and_labels_are_exact(criteo_file: Path) -> None:
    batch = read_all(CriteoDataset(criteo_file, base_time_ms=1000, step_ms=7))
    assert batch.num_rows == 2
    assert batch.labels.tolist() == [1.0, 0.0]
    assert batch.event_times.tolist() == [1000, 1007]
    row0 = ids_of(batch, 0)
    for k in range(26):
        expected = [] if k == 4 else [hash64(f"C{k + 1}", CATS_A[k])]
        assert row0[f"C{k + 1}"] == expected
    assert ids_of(batch, 1)["C5"] == [hash64("C5", "b4")]
    want = [math.log1p(max(float(v), 0.0)) if v else 0.0 for v in INTS_A]
    np.testing.assert_allclose(batch.dense[0], np.float32(want), rtol=0, atol=0)
    assert batch.dense[0, 1] == 0.0  # -3 clipped to 0 before log1p
    assert batch.dense.shape == (2, 13)


def test_criteo_default_times_and_missing_indicators(criteo_file: Path) -> None:
    batch = read_all(CriteoDataset(criteo_file, missing_indicators=True))
    assert batch.event_times.tolist() == [
        DEFAULT_BASE_TIME_MS,
        DEFAULT_BASE_TIME_MS + DEFAULT_STEP_MS,
    ]
    assert batch.dense.shape == (2, 26)
    assert batch.dense[0, 13:].tolist() == [1.0 if not v else 0.0 for v in INTS_A]
    assert batch.dense[1, 13:].tolist() == [0.0] * 13


def test_criteo_reads_gzip_and_ignores_blank_lines(tmp_path: Path, criteo_file: Path) -> None:
    gz = tmp_path / "day.tsv.gz"
    with gzip.open(gz, "wt") as f:
        f.write(criteo_file.read_text() + "\n\n")
    assert read_all(CriteoDataset(gz)).equals(read_all(CriteoDataset(criteo_file)))
    broken = tmp_path / "broken.tsv.gz"
    broken.write_bytes(gz.read_bytes()[:-20])
    with pytest.raises(DatasetError, match=r"broken.tsv.gz: cannot read"):
        list(CriteoDataset(broken).batches())
    latin = tmp_path / "latin.tsv"
    latin.write_bytes(criteo_file.read_bytes().replace(b"b25", b"\xe9"))
    with pytest.raises(DatasetError, match=r"latin.tsv: cannot read: 'utf-8' codec"):
        list(CriteoDataset(latin).batches())


def test_criteo_malformed_lines_name_file_and_line(tmp_path: Path) -> None:
    good = criteo_line("0", INTS_B, CATS_B)
    cases = {
        "short": "0\t1\t2\n",
        "label": criteo_line("2", INTS_B, CATS_B),
        "dense": criteo_line("1", ["x", *INTS_B[1:]], CATS_B),
        "nan": criteo_line("1", ["nan", *INTS_B[1:]], CATS_B),
    }
    for why, bad in cases.items():
        path = tmp_path / f"{why}.tsv"
        path.write_text(good + good + bad + good)
        with pytest.raises(DatasetError) as err:
            list(CriteoDataset(path).batches())
        assert f"{path}:3:" in str(err.value), why
        assert err.value.line == 3


def test_criteo_skip_counts_bad_rows_and_keeps_exact_batches(tmp_path: Path) -> None:
    lines = [criteo_line(str(i % 2), INTS_B, [f"v{i}"] * 26) for i in range(9)]
    lines[2] = "garbage\n"
    lines[6] = criteo_line("7", INTS_B, CATS_B)
    path = tmp_path / "skip.tsv"
    path.write_text("".join(lines))
    ds = CriteoDataset(path, on_error="skip", base_time_ms=0, step_ms=1)
    batches = list(ds.batches(batch_rows=2))
    assert [b.num_rows for b in batches] == [2, 2, 2, 1]
    assert ds.skipped == 2
    assert [e.line for e in ds.skip_examples] == [3, 7]
    merged = concat(batches)
    kept = [0, 1, 3, 4, 5, 7, 8]
    assert merged.event_times.tolist() == kept  # times follow the original lines
    assert [ids_of(merged, r)["C1"] for r in range(7)] == [[hash64("C1", f"v{i}")] for i in kept]
    list(ds.batches(3, limit=4))
    assert ds.skipped == 1  # counts reset per pass; the limit stops before line 7


def test_batches_limit_and_sizes(tmp_path: Path) -> None:
    path = tmp_path / "n.tsv"
    path.write_text("".join(criteo_line("0", INTS_B, [str(i)] * 26) for i in range(10)))
    ds = CriteoDataset(path)
    assert [b.num_rows for b in ds.batches(4)] == [4, 4, 2]
    assert [b.num_rows for b in ds.batches(4, limit=6)] == [4, 2]
    assert list(ds.batches(4, limit=0)) == []
    assert concat(list(ds.batches(3))).equals(read_all(ds, 1024))
    rows = list(ds.rows(limit=3))
    assert [r.features["C2"].tolist() for r in rows] == [[hash64("C2", str(i))] for i in range(3)]
    with pytest.raises(DatasetError, match="batch_rows"):
        list(ds.batches(0))


# -- Avazu -------------------------------------------------------------------------------

AVAZU = (
    "id,click,hour,C1,banner_pos,site_id,device_ip\n"
    "10000169349117863715,0,14102100,1005,0,1fbe01fe,96809ac8\n"
    "10000371904215119486,1,14102813,1002,,85f751fd,b3cf8def\n"
)


def test_avazu_ids_labels_and_hour_times(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text(AVAZU)
    ds = AvazuDataset(path)
    slots = ("C1", "banner_pos", "site_id", "device_ip", "hour_of_day", "day_of_week")
    assert ds.config.slots == slots
    batch = read_all(ds)
    assert batch.labels.tolist() == [0.0, 1.0]
    t0 = datetime(2014, 10, 21, 0, tzinfo=timezone.utc)
    t1 = datetime(2014, 10, 28, 13, tzinfo=timezone.utc)
    assert batch.event_times.tolist() == [int(t0.timestamp() * 1000), int(t1.timestamp() * 1000)]
    assert ids_of(batch, 0) == {
        "C1": [hash64("C1", "1005")],
        "banner_pos": [hash64("banner_pos", "0")],
        "site_id": [hash64("site_id", "1fbe01fe")],
        "device_ip": [hash64("device_ip", "96809ac8")],
        "hour_of_day": [hash64("hour_of_day", "00")],
        "day_of_week": [hash64("day_of_week", str(t0.weekday()))],
    }
    assert ids_of(batch, 1)["banner_pos"] == []  # empty value: no id
    assert ids_of(batch, 1)["hour_of_day"] == [hash64("hour_of_day", "13")]
    assert AvazuDataset(path, time_slots=False).config.slots == slots[:4]


def test_avazu_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("id,hour,C1\n1,14102100,5\n")
    with pytest.raises(DatasetError, match="lacks click"):
        AvazuDataset(path)
    for row, why in [("3,1,14102199,5", "not a valid date"), ("3,x,14102100,5", "click")]:
        path.write_text(f"id,click,hour,C1\n1,0,14102100,5\n{row}\n")
        with pytest.raises(DatasetError, match=why) as err:
            list(AvazuDataset(path).batches())
        assert err.value.line == 3
    path.write_text("id,click,hour,C1\n1,0,14102100\n2,1,14102100,7\n")
    ds = AvazuDataset(path, on_error="skip")
    assert read_all(ds).labels.tolist() == [1.0]
    assert ds.skipped == 1 and "expected 4 fields" in str(ds.skip_examples[0])


# -- MovieLens ---------------------------------------------------------------------------


@pytest.fixture
def ml1m(tmp_path: Path) -> Path:
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "ratings.dat").write_text("1::10::5::978300760\n2::20::3::978300000\n9::10::4::5\n")
    (folder / "movies.dat").write_bytes(
        "10::Amélie (2001)::Comedy|Romance\n20::Heat (1995)::Action\n".encode("latin-1")
    )
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    return folder


def test_movielens_join_threshold_and_times(ml1m: Path) -> None:
    ds = MovieLensDataset(ml1m)
    assert ds.config.slots == ("user_id", "movie_id", "genres", "gender", "age", "occupation")
    batch = read_all(ds)
    assert batch.labels.tolist() == [1.0, 0.0, 1.0]
    assert batch.event_times.tolist() == [978300760000, 978300000000, 5000]
    assert ids_of(batch, 0) == {
        "user_id": [hash64("user_id", "1")],
        "movie_id": [hash64("movie_id", "10")],
        "genres": [hash64("genres", "Comedy"), hash64("genres", "Romance")],
        "gender": [hash64("gender", "F")],
        "age": [hash64("age", "1")],
        "occupation": [hash64("occupation", "10")],
    }
    assert ids_of(batch, 2)["gender"] == []  # user 9 is not in users.dat
    assert read_all(MovieLensDataset(ml1m, threshold=5)).labels.tolist() == [1.0, 0.0, 0.0]
    ordered = read_all(MovieLensDataset(ml1m / "ratings.dat", sort_by_time=True), 2)
    assert ordered.event_times.tolist() == [5000, 978300000000, 978300760000]


def test_movielens_csv_format_and_bad_rows(tmp_path: Path) -> None:
    (tmp_path / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.5,1000\n1,2,x,1001\n2,2,3.5,1002\n"
    )
    (tmp_path / "movies.csv").write_text(
        'movieId,title,genres\n1,"Toy Story, The (1995)",Animation|Children\n'
        "2,Unknown (2020),(no genres listed)\n"
    )
    with pytest.raises(DatasetError, match=r"ratings.csv:3: rating: not a number"):
        list(MovieLensDataset(tmp_path).batches())
    ds = MovieLensDataset(tmp_path, on_error="skip")
    assert ds.config.slots == ("user_id", "movie_id", "genres")
    batch = read_all(ds)
    assert ds.skipped == 1
    assert batch.labels.tolist() == [1.0, 0.0]
    assert batch.event_times.tolist() == [1_000_000, 1_002_000]
    assert ids_of(batch, 0)["genres"] == [
        hash64("genres", "Animation"),
        hash64("genres", "Children"),
    ]
    assert ids_of(batch, 1)["genres"] == []


# -- generic CSV with a mapping ----------------------------------------------------------

MAPPING = """
label: {column: clicked, values: {"yes": 1, "no": 0}}
timestamp: {column: ts, format: iso8601}
weight: w
categorical:
  - {column: user, slot: user_id}
  - {column: tags, separator: "|"}
dense:
  - {column: price, transform: log1p, indicator: true}
  - {column: score, transform: signed_log1p, missing: 1.5}
"""
ROWS = (
    "clicked,ts,w,user,tags,price,score\n"
    "yes,2024-01-02T03:04:05Z,2,alice,a|b,9,-3\n"
    "no,2024-01-02T03:04:06,0.5,,,,\n"
)


def write_csv(tmp_path: Path, mapping: str, rows: str) -> tuple[Path, Path]:
    (tmp_path / "m.yaml").write_text(mapping)
    (tmp_path / "data.csv").write_text(rows)
    return tmp_path / "data.csv", tmp_path / "m.yaml"


def test_csv_mapping_exact(tmp_path: Path) -> None:
    data, mapping = write_csv(tmp_path, MAPPING, ROWS)
    ds = open_dataset(data, mapping=mapping)
    assert isinstance(ds, CsvDataset)
    assert ds.config.slots == ("user_id", "tags") and ds.config.dense_dim == 3
    batch = read_all(ds)
    assert batch.labels.tolist() == [1.0, 0.0]
    assert batch.weights.tolist() == [2.0, 0.5]
    t = int(datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc).timestamp() * 1000)
    assert batch.event_times.tolist() == [t, t + 1000]
    assert ids_of(batch, 0) == {
        "user_id": [hash64("user_id", "alice")],
        "tags": [hash64("tags", "a"), hash64("tags", "b")],
    }
    assert ids_of(batch, 1) == {"user_id": [], "tags": []}
    want = [[math.log1p(9), -math.log1p(3), 0.0], [0.0, math.log1p(1.5), 1.0]]
    np.testing.assert_allclose(batch.dense, np.float32(want), rtol=0, atol=0)


def test_csv_threshold_epoch_and_headerless_derived_times(tmp_path: Path) -> None:
    mapping = "label: {column: r, threshold: 4}\ntimestamp: {column: t, format: epoch_s}\n"
    data, m = write_csv(
        tmp_path, mapping + "categorical: [{column: u}]\n", "r,t,u\n5,10,x\n3,11,y\n"
    )
    batch = read_all(open_dataset(data, mapping=m))
    assert batch.labels.tolist() == [1.0, 0.0]
    assert batch.event_times.tolist() == [10_000, 11_000]
    headless = "header: false\ncolumns: [y, a]\nlabel: {column: y}\nbase_time_ms: 100\nstep_ms: 5\n"
    data, m = write_csv(tmp_path, headless + "categorical: [{column: a}]\n", "1,p\n0,q\n\n1,r\n")
    batch = read_all(open_dataset(data, mapping=m))
    assert batch.event_times.tolist() == [100, 105, 115]  # the blank line 3 is not a row
    assert ids_of(batch, 2) == {"a": [hash64("a", "r")]}


def test_csv_strptime_format(tmp_path: Path) -> None:
    mapping = 'label: {column: y}\ntimestamp: {column: h, format: "%Y%m%d%H"}\n'
    data, m = write_csv(tmp_path, mapping, "y,h\n1,2014102113\n0,2014102114\n")
    t = int(datetime(2014, 10, 21, 13, tzinfo=timezone.utc).timestamp() * 1000)
    assert read_all(open_dataset(data, mapping=m)).event_times.tolist() == [t, t + 3_600_000]


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ("label: {column: y}\nbogus: 1\n", "bogus: Extra inputs are not permitted"),
        ("categorical: []\n", "label: Field required"),
        ("label: {column: nope}\n", "columns the file lacks: nope"),
        ("label: {column: y}\ntimestamp: {column: y, format: weird}\n", "strptime pattern"),
        ("label: [unclosed\n", "not valid YAML"),
        ("label: {column: y}\ncategorical: [{column: y}, {column: y}]\n", "duplicate name"),
    ],
)
def test_csv_mapping_errors_name_the_problem(tmp_path: Path, mapping: str, message: str) -> None:
    data, m = write_csv(tmp_path, mapping, "y\n1\n")
    with pytest.raises(DatasetError, match=message) as err:
        open_dataset(data, mapping=m)
    assert str(m) in str(err.value)


def test_csv_bad_cells_name_the_line(tmp_path: Path) -> None:
    data, m = write_csv(tmp_path, MAPPING, ROWS + "maybe,2024-01-02T03:04:06,1,b,,1,1\n")
    with pytest.raises(DatasetError, match=r"data.csv:4: clicked: 'maybe' is not one of"):
        list(open_dataset(data, mapping=m).batches())
    data, m = write_csv(tmp_path, MAPPING, ROWS + "no,yesterday,-1,b,,1,1\n")
    ds = open_dataset(data, mapping=m, on_error="skip")
    assert read_all(ds).num_rows == 2 and ds.skipped == 1
    assert "ts: 'yesterday' is not a iso8601 time" in str(ds.skip_examples[0])


# -- registry ----------------------------------------------------------------------------


def test_detect_format_and_registry_errors(tmp_path: Path, criteo_file: Path, ml1m: Path) -> None:
    avazu = tmp_path / "some.csv"
    avazu.write_text(AVAZU)
    assert detect_format(criteo_file) == "criteo"
    assert detect_format(avazu) == "avazu"
    assert detect_format(ml1m) == "movielens"
    assert detect_format(ml1m / "ratings.dat") == "movielens"
    assert isinstance(open_dataset(avazu), AvazuDataset)
    assert isinstance(open_dataset(criteo_file, "criteo", step_ms=1), CriteoDataset)
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(DatasetError, match="cannot tell the dataset format"):
        open_dataset(other)
    with pytest.raises(DatasetError, match="unknown dataset format 'parquet'"):
        open_dataset(other, "parquet")
    with pytest.raises(DatasetError, match="mapping file is required"):
        open_dataset(other, "csv")
    with pytest.raises(DatasetError, match="applies only to format 'csv'"):
        open_dataset(criteo_file, "criteo", mapping=tmp_path / "m.yaml")
    with pytest.raises(DatasetError, match="does not take option.*threshold"):
        open_dataset(criteo_file, threshold=3)
    with pytest.raises(DatasetError, match="no such file"):
        open_dataset(tmp_path / "absent.tsv", "criteo")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=40), max_size=20), st.sampled_from(["C1", "genres"]))
def test_hash_strs_matches_hash64(values: list[str], slot: str) -> None:
    clean = [v.encode("utf-8", "ignore").decode("utf-8") for v in values]  # no lone surrogates
    assert hash_strs(slot, clean).tolist() == [hash64(slot, v) for v in clean]


# -- the real samples in ../shared/data --------------------------------------------------


@pytest.mark.parametrize(("name", "rows"), [("train", 7200), ("dev", 409), ("test", 391)])
def test_real_criteo_samples(shared_data: Path, name: str, rows: int) -> None:
    path = shared_data / "criteo" / f"{name}.tsv"
    batch = read_all(open_dataset(path), 1000)
    fields = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()]
    assert batch.num_rows == rows == len(fields)
    assert batch.labels.sum() == sum(int(f[0]) for f in fields)
    assert 0.18 < batch.labels.mean() < 0.26
    assert len(batch.ids) == sum(1 for f in fields for v in f[14:] if v)
    assert ids_of(batch, rows - 1)["C26"] == (
        [hash64("C26", fields[-1][39])] if fields[-1][39] else []
    )


def test_real_avazu_sample(shared_data: Path) -> None:
    path = shared_data / "avazu" / "train.csv"
    ds = open_dataset(path)
    batch = read_all(ds, 1000)
    assert batch.num_rows == 8087 and ds.skipped == 0
    assert 0.15 < batch.labels.mean() < 0.19
    clicks = [line.split(",")[1] for line in path.read_text().splitlines()[1:]]
    assert batch.labels.sum() == clicks.count("1")
    assert len(ds.config.slots) == 21 + 2
