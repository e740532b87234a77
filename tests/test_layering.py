"""Pins the layering: bus at the bottom, modellink beside it, agents above, orchestrator on top."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
OURS = {"bus", "modellink", "agents", "orchestrator"}
# package -> the packages of ours it may import
ALLOWED = {
    "bus": set(),
    "modellink": {"bus"},
    "agents": {"bus", "modellink"},
    "orchestrator": {"bus", "modellink", "agents"},
}


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


def test_each_package_imports_only_the_layers_below_it():
    bad = []
    for pkg, allowed in ALLOWED.items():
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for imp in _imports(path) - allowed - {pkg}:
                bad.append(f"{path.relative_to(ROOT)} imports {imp}")
    assert not bad, "layering violated:\n" + "\n".join(bad)


def test_layering_check_sees_a_violation(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("import orchestrator.cli\nfrom agents import loop\nimport os\n")
    assert _imports(p) == {"orchestrator", "agents"}
