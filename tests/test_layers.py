"""The package's layers, enforced: every import inside ``zmqsyft`` points down, never up or across.

``errors, config, ids, allowlist`` <- ``wire/*`` <- ``worker/*`` and ``client/*``, which never
import each other; ``federated/*`` (PySyft's import paths) re-exports ``client/*``; inside each layer a module imports only those before it in :data:`ORDER`.
Every import counts: module-level, function-level and ``if TYPE_CHECKING:`` ones alike, since a
deferred import is still a dependency (it is how import circles used to hide).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "zmqsyft"

# each layer's modules, lowest first; a module may import those before it in its own layer
ORDER: dict[str, list[str]] = {
    "top": ["errors", "config", "ids", "secret", "allowlist", "keys", "privacy", "forkserver", "metakernels", "heap"],
    "wire": ["messages", "tags", "schema", "bodies", "shm_live", "shm", "tensors", "values", "codec", "exc_codec", "watch",
             "transport",
             "bulk", "channel", "rpc", "__init__"],
    "worker": ["freeze", "access", "leases", "store", "executor", "costs", "traffic", "gate", "peerlink", "peers", "sealed", "context", "results", "chains", "labels", "intake", "catalog", "objects",
               "calls", "admin", "owner", "loop", "__init__"],
    "client": ["local", "interrupts", "forked", "forks", "handle", "lost", "outbox", "link", "linkprobe", "connection", "reaper", "grads", "dispatch",
               "pointer_attrs", "pointer", "session", "api",
               "launch", "nn", "plantrace", "plan", "smpc", "fixed", "data", "loader", "optims", "hook", "grid", "sandbox", "__init__"],
    # PySyft's import paths (``zmqsyft.federated.floptimizer``), re-exporting the client's
    "federated": ["floptimizer", "__init__"],
}
# the layers a layer may import besides its own lower modules
BELOW = {"top": set(), "wire": {"top"}, "worker": {"top", "wire"}, "client": {"top", "wire"},
         "federated": {"top", "client"}}
PACKAGES = [layer for layer in ORDER if layer != "top"]
ENTRY = {"zmqsyft", "zmqsyft.__main__"}  # the public face and the CLI: may import anything


def _place(module: str) -> tuple[str, int]:
    """(layer, rank) of a dotted module name inside zmqsyft."""
    parts = module.split(".")[1:]
    if len(parts) == 1 and parts[0] in ORDER["top"]:
        return "top", ORDER["top"].index(parts[0])
    if parts and parts[0] in PACKAGES:
        name = parts[1] if len(parts) > 1 else "__init__"
        if name in ORDER[parts[0]]:
            return parts[0], ORDER[parts[0]].index(name)
    raise AssertionError(f"{module} is not placed in tests/test_layers.py's ORDER: add it to "
                         "its layer, after every module it imports")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":  # a package is named by its folder
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The zmqsyft modules one import statement brings in."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "zmqsyft"]
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "zmqsyft":
        return []
    out = []
    for alias in node.names:  # `from . import shm` imports the module zmqsyft.wire.shm
        sub = f"{target}.{alias.name}"
        path = PACKAGE.parent.joinpath(*sub.split("."))
        out.append(sub if path.with_suffix(".py").exists() or path.is_dir() else target)
    return out


def imports_of(module: str, source: str, is_package: bool = False) -> set[str]:
    """Every zmqsyft module ``source`` imports, wherever the import statement stands."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update(_resolve(module, is_package, node))
    return {m[: -len(".__init__")] if m.endswith(".__init__") else m for m in found}


def violations(module: str, imported: set[str]) -> list[str]:
    """The imports of ``module`` that go against the direction, each with the reason."""
    if module in ENTRY:
        return []
    layer, rank = _place(module)
    bad = []
    for target in sorted(imported):
        if target == "zmqsyft":
            bad.append(f"{module} imports the package root (the public face imports it, not back)")
            continue
        t_layer, t_rank = _place(target)
        if t_layer == layer:
            if t_rank >= rank:
                bad.append(f"{module} imports {target}, which is not below it in {layer}/")
        elif t_layer not in BELOW[layer]:
            bad.append(f"{module} ({layer}) imports {target} ({t_layer}): against the layers")
    return bad


def test_every_import_points_down() -> None:
    modules = _modules()
    assert len(modules) > 30, modules
    problems = []
    for name, path in modules.items():
        imported = imports_of(name, path.read_text(), is_package=path.name == "__init__.py")
        problems += violations(name, imported)
    assert not problems, "\n".join(problems)


def test_every_module_is_placed_and_the_order_names_only_real_modules() -> None:
    modules = set(_modules()) - ENTRY
    for name in modules:
        _place(name)
    listed = {f"zmqsyft.{m}" for m in ORDER["top"]} | {
        f"zmqsyft.{layer}" if m == "__init__" else f"zmqsyft.{layer}.{m}"
        for layer in PACKAGES for m in ORDER[layer]}
    assert listed == modules, (listed ^ modules)


def test_no_module_over_about_400_lines() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert max(sizes.values()) <= 420, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.parametrize(("module", "source", "expected"), [
    # a deferred import is still an import: the worker may not reach into the client
    ("zmqsyft.worker.calls", "def f():\n    from ..client import session\n",
     "against the layers"),
    ("zmqsyft.client.api", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
     "    from zmqsyft.worker.store import Store\n", "against the layers"),
    ("zmqsyft.wire.codec", "from . import rpc\n", "not below it"),  # upward inside wire/
    ("zmqsyft.client.pointer", "from .session import Session\n", "not below it"),
    ("zmqsyft.errors", "from .wire import messages\n", "against the layers"),
    ("zmqsyft.client.hook", "import zmqsyft\n", "package root"),
])
def test_the_checker_catches_imports_against_the_direction(module: str, source: str,
                                                           expected: str) -> None:
    problems = violations(module, imports_of(module, source))
    assert problems and expected in problems[0], problems


def test_the_checker_lets_downward_imports_through() -> None:
    source = ("from ..wire.bodies import Put\nfrom .. import allowlist\nfrom . import executor\n"
              "def f():\n    from .store import Store\n")
    assert imports_of("zmqsyft.worker.calls", source) == {
        "zmqsyft.wire.bodies", "zmqsyft.allowlist", "zmqsyft.worker.executor",
        "zmqsyft.worker.store"}
    assert violations("zmqsyft.worker.calls", imports_of("zmqsyft.worker.calls", source)) == []
