"""What each part of the package may import (each layer only the layers below it, study files
without torch, training without optuna, the read-only commands free of torch), and how large a
module, a function and a command may grow."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from hpo.search.storage import open_storage
from hpo.search.study import create_or_load
from hpo.settings import config

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hpo"
# The layers, lowest first: each may import itself and those before it, and the shared modules.
LAYERS = ("settings", "learn", "search", "results", "bench")
SHARED = {"errors", "attrs", "paths"}  # import nothing of hpo's but each other
APPS = {"cli", "launch", "__main__"}  # the commands and the sequences they run: may import anything
FORBIDDEN = {"settings": ("torch", "torchvision"), "learn": ("optuna", "optuna_dashboard")}


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function, as dotted names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            ours = node.module == "hpo" or node.module.startswith("hpo.")  # `from hpo import x` is hpo.x
            found |= {f"{node.module}.{a.name}" for a in node.names} if ours else {node.module}
    return found


def layer_of(module: str) -> str | None:
    """`hpo.search.worker` -> "search"; `hpo.errors` -> "errors"; None for what is not hpo's."""
    parts = module.split(".")
    return parts[1] if parts[0] == "hpo" and len(parts) > 1 else None


def breaches(path: Path) -> list[str]:
    """What `path` imports that its place in the tree forbids."""
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    if own in APPS or own == "__init__":
        return []
    allowed = SHARED if own in SHARED else SHARED | set(LAYERS[: LAYERS.index(own) + 1])
    found = imports(path)
    wrong = sorted(m for m in found if layer_of(m) is not None and layer_of(m) not in allowed)
    wrong += sorted(m for m in found if m.split(".")[0] in FORBIDDEN.get(own, ()))
    return wrong


def test_every_module_sits_in_a_known_place():
    for path in PACKAGE.rglob("*.py"):
        top = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        assert top in {*LAYERS, *SHARED, *APPS, "__init__"}, f"{path}: add it to a layer in this test"


def test_each_layer_imports_only_the_layers_below_it():
    wrong = {str(p.relative_to(PACKAGE)): b for p in sorted(PACKAGE.rglob("*.py")) if (b := breaches(p))}
    assert wrong == {}


def test_the_layering_check_catches_a_forbidden_import(tmp_path, monkeypatch):
    """The check above can fail: a training module that imports the search, or optuna, is caught."""
    fake = tmp_path / "hpo"
    (fake / "learn").mkdir(parents=True)
    (fake / "learn" / "model.py").write_text("import optuna\nfrom hpo.search import budget\n")
    (fake / "settings").mkdir()
    (fake / "settings" / "config.py").write_text("def load():\n    import torch\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert breaches(fake / "learn" / "model.py") == ["hpo.search.budget", "optuna"]
    assert breaches(fake / "settings" / "config.py") == ["torch"]


MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_PARAMETERS, MAX_COMMAND_BODY = 400, 50, 6, 15


def sizes(path: Path) -> list[str]:
    """What in `path` is past the size rules: a module over 400 lines, a function over 50, one that
    takes more than 6 parameters (click commands aside: their options are their parameters), or a
    command whose body, decorators and docstring aside, is over 15 lines."""
    text = path.read_text()
    found = [f"{len(text.splitlines())} lines"] if len(text.splitlines()) > MAX_MODULE_LINES else []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        command = any("command" in ast.unparse(d) for d in node.decorator_list)
        a = node.args
        params = len(a.posonlyargs + a.args + a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
        params -= bool(a.args) and a.args[0].arg in ("self", "cls")
        if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
            found.append(f"{node.name}: {node.end_lineno - node.lineno + 1} lines")
        if params > MAX_PARAMETERS and not command:
            found.append(f"{node.name}: {params} parameters")
        body = node.body[1:] if ast.get_docstring(node) is not None else node.body
        if command and body and node.end_lineno - body[0].lineno + 1 > MAX_COMMAND_BODY:
            found.append(f"{node.name}: a command body of {node.end_lineno - body[0].lineno + 1} lines")
    return found


def test_modules_and_functions_stay_small_enough_to_read_whole():
    found = {str(p.relative_to(PACKAGE)): s for p in sorted(PACKAGE.rglob("*.py")) if (s := sizes(p))}
    assert found == {}


def test_the_size_check_catches_a_long_function_and_a_long_parameter_list(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(50))
    (tmp_path / "big.py").write_text(f"def long():\n{body}\n\n\ndef wide(a, b, c, d, e, f, g):\n    pass\n")
    assert sizes(tmp_path / "big.py") == ["long: 51 lines", "wide: 7 parameters"]


RUN_IN_PROCESS = """
import json, sys
from hpo.cli import cli
cli.main(args=sys.argv[1:], standalone_mode=False)
print(json.dumps(sorted(m for m in ("torch", "torchvision", "matplotlib") if m in sys.modules)))
"""


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('layers') / 'hpo.db'}"
    study, _ = create_or_load(open_storage(url), config.load("tiny"))
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))  # for `hpo best`
    return url


@pytest.mark.parametrize("command", [["status", "--study", "tiny"], ["studies"], ["best", "--study", "tiny"]])
def test_the_read_only_commands_import_no_torch(url, command):
    """`hpo status`, `hpo studies` and `hpo best` run where torch is slow to import or absent (a
    laptop watching a GPU host's study): they must not load it, nor matplotlib."""
    result = subprocess.run(
        [sys.executable, "-c", RUN_IN_PROCESS, *command, "--storage", url, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    *output, loaded = result.stdout.strip().splitlines()
    assert json.loads("\n".join(output))["schema"].startswith("hpo-"), result.stdout
    assert json.loads(loaded) == [], f"`hpo {command[0]}` imported {json.loads(loaded)}"
