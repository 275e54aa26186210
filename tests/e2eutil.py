"""Helpers of the multi-process end-to-end tests (roles run as `pipeline` processes)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.ingest.generator import SLOTS
from pipeline.ps.catalog import load_catalog

__all__ = ["wait_for", "write_specs"]


def write_specs(
    tmp: Path, unique: str, serving: Mapping[str, Any] | None = None
) -> tuple[Path, Path]:
    """The default catalog under unique table names and a DeepFM over the generator's slots.

    ``serving`` replaces every table's serving spec (e.g. float32, unfiltered).
    """
    tables = []
    for spec in load_catalog():
        data = spec.to_dict()
        data["name"] = f"{unique}_{spec.name}"
        if serving is not None:
            data["serving"] = dict(serving)
        tables.append(data)
    catalog = tmp / "tables.yaml"
    catalog.write_text(yaml.safe_dump({"tables": tables}))
    model = tmp / "model.yaml"
    model.write_text(
        yaml.safe_dump(
            {
                "name": f"m{unique}",
                "kind": "deepfm",
                "slots": list(SLOTS),
                "dense_dim": 0,
                "wide_table": f"{unique}_wide",
                "deep_table": f"{unique}_deep",
                "deep_dim": 16,
                "hidden": [32, 16],
            }
        )
    )
    return catalog, model


def wait_for(
    what: str,
    done: Callable[[], Any],
    timeout: float,
    procs: Sequence[subprocess.Popen[str]],
) -> None:
    """Poll ``done`` until true; fail when a process exits early or time runs out."""
    deadline = time.monotonic() + timeout
    while not done():
        for p in procs:
            assert p.poll() is None, f"{p.args!r} exited early while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
