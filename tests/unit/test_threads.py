"""The thread budget: resolution order, environment, CLI option, shares."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline import threads
from pipeline.cli.main import cli
from pipeline.errors import ConfigError

pytestmark = pytest.mark.unit


def test_resolve_prefers_the_argument_then_the_env_then_the_cpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PIPELINE_THREADS", "3")
    assert threads.resolve(2) == 2
    assert threads.resolve() == 3
    monkeypatch.delenv("PIPELINE_THREADS")
    assert threads.resolve() == threads.available_cpus() >= 1


@pytest.mark.parametrize("raw", ["0", "-1", "two"])
def test_a_bad_budget_names_the_setting(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("PIPELINE_THREADS", raw)
    with pytest.raises(ConfigError, match="PIPELINE_THREADS"):
        threads.resolve()


def test_apply_env_sizes_every_pool_and_keeps_explicit_wait_policy() -> None:
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    threads.apply_env(2, env)
    assert env["PIPELINE_THREADS"] == env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "2"
    assert env["MKL_NUM_THREADS"] == "2"
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's choice stands
    fresh: dict[str, str] = {}
    threads.apply_env(1, fresh)
    assert fresh["OMP_WAIT_POLICY"] == "PASSIVE"  # never spin by default


def test_budget_from_argv_reads_only_options_before_the_subcommand() -> None:
    assert threads.budget_from_argv(["--threads", "2", "train"]) == 2
    assert threads.budget_from_argv(["--log-level", "info", "--threads=3", "ps"]) == 3
    assert threads.budget_from_argv(["train", "--threads", "2"]) is None
    assert threads.budget_from_argv(["--threads", "x", "train"]) is None  # click reports it
    assert threads.budget_from_argv([]) is None


def test_cgroup_quota_v2_and_v1(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads._cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads._cgroup_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert threads._cgroup_quota(v1) == 2.0
    assert threads._cgroup_quota(tmp_path / "absent") is None


def test_share_gives_every_role_at_least_one_thread() -> None:
    assert threads.share(8, {"train0": 3, "train1": 3, "ps": 1, "join": 1}) == {
        "train0": 3,
        "train1": 3,
        "ps": 1,
        "join": 1,
    }
    assert set(threads.share(2, {"a": 1, "b": 1, "c": 1}).values()) == {1}
    with pytest.raises(ValueError):
        threads.share(0, {"a": 1})


def test_cli_option_sets_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.delenv("PIPELINE_THREADS", raising=False)
    try:
        result = CliRunner().invoke(cli, ["--threads", "1", "config", "show"])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
        assert "PIPELINE_THREADS=1" in result.output
        bad = CliRunner().invoke(cli, ["--threads", "0", "config", "show"])
        assert bad.exit_code == 2 and "--threads" in bad.output
    finally:
        torch.set_num_threads(before)


def test_entry_point_sets_the_environment_before_torch_loads() -> None:
    """A child started through the entry point sees the budget in its OpenMP settings."""
    code = (
        "import os, sys; sys.argv = ['pipeline', '--threads', '1', 'config', 'show'];"
        "from pipeline.cli.entry import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "import torch; print('RESULT', os.environ['OMP_NUM_THREADS'],"
        " os.environ['OMP_WAIT_POLICY'], torch.get_num_threads())"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OMP_")}
    env.pop("PIPELINE_THREADS", None)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
    assert line == ["RESULT 1 PASSIVE 1"], out.stdout + out.stderr
