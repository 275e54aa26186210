"""Offline checks shared by the deployment tests (docker-compose.yml, deploy/k8s/).

Nothing here runs a container: commands are parsed by the real click CLI down to
their leaf command (unknown subcommands and options fail), healthcheck snippets
are compiled, and the Redis keys they probe are compared with the project's own
key functions.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
from click.testing import CliRunner

from pipeline.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"

__all__ = [
    "DOCKERFILE",
    "ROOT",
    "app_paths",
    "check_cli_call",
    "image_paths",
    "in_image",
    "local_path",
    "option",
    "parse_cli_call",
    "shell_cli_call",
]


def parse_cli_call(args: list[str]) -> list[str]:
    """Parse ``pipeline ARGS`` down to the leaf command without running it.

    Returns the subcommand path; raises AssertionError on an unknown subcommand
    and click.UsageError on an unknown option or a bad value.
    """
    command: click.Command = cli
    path: list[str] = []
    rest = list(args)
    while isinstance(command, click.Group):
        assert rest, f"{args}: a command group needs a subcommand"
        name, *rest = rest
        sub = command.get_command(click.Context(command), name)
        assert sub is not None, f"unknown subcommand {name!r} in {args}"
        command = sub
        path.append(name)
    command.make_context(path[-1], rest)  # parses the options: UsageError when invalid
    return path


def check_cli_call(args: list[str], where: str, files: dict[str, Path] | None = None) -> list[str]:
    """parse_cli_call plus ``pipeline PATH --help`` exiting 0 (the command loads).

    Options that must name an existing file are checked against what the
    container would have: an image path /app/X must be copied by the Dockerfile
    and is read from the repository's X; ``files`` maps other container paths
    (e.g. ConfigMap mounts) to local files.
    """
    mapped = []
    for arg in args:
        if arg in (files or {}):
            arg = str((files or {})[arg])
        elif arg.startswith("/app/"):
            assert in_image(arg), f"{where}: {arg} is not copied into the image"
            arg = str(local_path(arg))
        mapped.append(arg)
    path = parse_cli_call(mapped)
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, f"{where}: pipeline {' '.join(path)} --help: {result.output}"
    return path


def shell_cli_call(script: str, env: dict[str, str]) -> list[str]:
    """The ``pipeline`` argv of a one-line ``sh -c`` script, after expanding ${VAR##*-}.

    Only the forms the manifests use are understood (``exec pipeline ...`` with
    ``${NAME}`` or ``${NAME##*-}``); anything else fails the test rather than
    being guessed at.
    """

    def expand(match: re.Match[str]) -> str:
        name, op = match.group(1), match.group(2)
        assert name in env, f"{script!r} uses ${{{name}}}, which the container does not define"
        value = env[name]
        if op == "##*-":
            return value.rsplit("-", 1)[-1]
        assert op is None, f"unsupported expansion {match.group(0)!r}"
        return value

    expanded = re.sub(r"\$\{(\w+)(##\*-)?\}", expand, script)
    assert "$" not in expanded, f"unexpanded variable left in {script!r}"
    words = shlex.split(expanded)
    if words and words[0] == "exec":
        words = words[1:]
    assert words and words[0] == "pipeline", f"{script!r} must run `exec pipeline ...`"
    return words[1:]


def option(args: list[str], name: str) -> str:
    """The value of ``--name VALUE`` in an argv (AssertionError when absent)."""
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def app_paths(args: list[str]) -> list[str]:
    """Absolute paths under /app/ that an argv refers to (files baked into the image)."""
    return [a for a in args if a.startswith("/app/")]


def image_paths() -> set[str]:
    """Paths under /app/ that the Dockerfile copies (COPY SRC DEST with WORKDIR /app)."""
    text = DOCKERFILE.read_text()
    assert "WORKDIR /app" in text
    out: set[str] = set()
    for src, dest in re.findall(r"^COPY\s+(?!--)(\S+)\s+(\S+)\s*$", text, flags=re.M):
        out.add("/app/" + dest.removeprefix("./").rstrip("/"))
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    return out


def in_image(path: str) -> bool:
    """True when ``path`` is one of the copied paths or lies under a copied folder."""
    return any(path == p or path.startswith(p + "/") for p in image_paths())


def local_path(path: str) -> Path:
    """The repository file that an image path /app/... was copied from."""
    assert path.startswith("/app/"), path
    return ROOT / path.removeprefix("/app/")
