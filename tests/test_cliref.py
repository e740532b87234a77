"""deploy/ says what the CLI does: the command reference is the argparse definitions', and every
command line in compose.yaml and the k8s manifests parses with today's flags."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from orchestrator import cliref
from orchestrator.cli import build_parser

DEPLOY = pathlib.Path(__file__).resolve().parent.parent / "deploy"


def test_readme_reference_is_generated_from_the_parser() -> None:
    text = cliref.README.read_text()
    assert cliref.current(text) == cliref.reference(build_parser()), (
        "deploy/README.md's command reference differs from the CLI's flags: run "
        "`python -m orchestrator.cliref --write` and commit the result")


def test_reference_lists_every_command_and_flag() -> None:
    parser = build_parser()
    section = cliref.reference(parser)
    for name, sub in cliref._commands(parser).items():
        assert f"### `orchestrator {name}" in section
        if name == "resume":  # its flags are run's, listed once
            continue
        for action in cliref._options(sub):
            for opt in action.option_strings:
                assert f"`{opt}" in section, (name, opt)


def _command_lines() -> list[tuple[str, list[str]]]:
    """(file, argv) for every `command: [...]` / `args: [...]` flow list under deploy/."""
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        text = re.sub(r"#[^\n\"]*$", "", path.read_text(), flags=re.M)
        for m in re.finditer(r"^\s*(?:command|args):\s*(\[[^\]]*\])", text, flags=re.M):
            found.append((path.name, json.loads(m.group(1))))
    return found


def test_deploy_files_have_command_lines() -> None:
    names = {name for name, _ in _command_lines()}
    assert {"compose.yaml", "orchestrator.yaml", "run-job.yaml", "workers.yaml"} <= names


@pytest.mark.parametrize(("where", "argv"), _command_lines(),
                         ids=[f"{n}:{a[0]}" for n, a in _command_lines()])
def test_deploy_command_lines_parse(where: str, argv: list[str]) -> None:
    args = build_parser().parse_args(argv)  # argparse exits 2 on an unknown flag or value
    assert args.command == argv[0], where


def test_no_leftover_todos_in_deploy() -> None:
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            assert "TODO" not in path.read_text(errors="replace"), path
