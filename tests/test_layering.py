"""The layering of gscfast's own imports, read from the source (issue 12): library code never
imports the studies, a study never imports another study, no private name crosses modules, no
import cycle (function-local imports included: they are cycles that only hide until run time),
nothing keyed by object identity, and frozen batch norm only in its two homes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gscfast
from gscfast.experiments import STUDIES

PACKAGE = Path(gscfast.__file__).resolve().parent
# The command line dispatches to the studies: the one library module above them.
ENTRY_POINTS = {"gscfast.__main__"}


def modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``package``."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def imports(package: Path) -> list[tuple[str, str, str | None, int]]:
    """``(importer, imported module, imported name or None, line)`` for every import of a module
    of ``package`` by another, at any depth; ``from M import sub`` of a submodule counts as an
    import of ``M.sub``."""
    mods = modules(package)
    found = []
    for mod, path in mods.items():
        here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in mods:
                        found.append((mod, sub, None, node.lineno))
                    elif target in mods:
                        found.append((mod, target, alias.name, node.lineno))
            elif isinstance(node, ast.Import):
                found += [(mod, a.name, None, node.lineno) for a in node.names if a.name in mods]
    return [f for f in found if f[1] != f[0]]


def experiments_imports(package: Path) -> list[str]:
    name = package.name
    return [
        f"{mod} line {line} imports {target}"
        for mod, target, _, line in imports(package)
        if target.startswith(f"{name}.experiments")
        and not mod.startswith(f"{name}.experiments")
        and mod not in ENTRY_POINTS
    ]


def study_imports(package: Path, studies: set[str]) -> list[str]:
    return [
        f"{mod} line {line} imports {target}"
        for mod, target, _, line in imports(package)
        if mod in studies and target in studies
    ]


# What the studies share through one path (issue 12): their files through ``outputs.write_files``,
# their command's shared options through ``outputs.add_study_arguments``, their training loops
# through ``training.EpochLoop``. A study importing one of these steps writes the recipe again.
RECIPE_STEPS = {
    "atomic_write",
    "write_json",
    "run_info",
    "add_runner_arguments",
    "save_training_state",
    "restore_training_state",
}


def recipe_bypasses(package: Path, studies: set[str]) -> list[str]:
    return [
        f"{mod} line {line} imports {name} from {target}"
        for mod, target, name, line in imports(package)
        if mod in studies and name in RECIPE_STEPS
    ]


def private_imports(package: Path) -> list[str]:
    return [
        f"{mod} line {line} imports {name} from {target}"
        for mod, target, name, line in imports(package)
        if name is not None and name.startswith("_") and not name.startswith("__")
    ]


# Frozen batch norm has one home for the engines (``frozen.frozen_stats``: the only forward pass
# that records batch statistics) and one for modules (``nn.freeze_batchnorm``: the only forward
# pre-hook), and keys statistics by position, never by object identity.
FROZEN_HOMES = {"ForwardCtx(record=...)": "frozen", "register_forward_pre_hook": "nn"}


def _calls(package: Path):
    """``(module, call node)`` for every call in every module of ``package``."""
    for mod, path in modules(package).items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                yield mod, node


def identity_keys(package: Path) -> list[str]:
    """Calls of the builtin ``id``: objects keyed by identity (ids are reused once freed)."""
    return [
        f"{mod} line {node.lineno} calls id()"
        for mod, node in _calls(package)
        if isinstance(node.func, ast.Name) and node.func.id == "id"
    ]


def frozen_outside_homes(package: Path) -> list[str]:
    """Each ``FROZEN_HOMES`` call (a pre-pass recording batch statistics, a forward pre-hook)
    made outside its home module."""
    found = []
    for mod, node in _calls(package):
        what = None
        if isinstance(node.func, ast.Name) and node.func.id == "ForwardCtx":
            if any(k.arg == "record" for k in node.keywords):
                what = "ForwardCtx(record=...)"
        elif isinstance(node.func, ast.Attribute) and node.func.attr == "register_forward_pre_hook":
            what = node.func.attr
        if what is not None and mod != f"{package.name}.{FROZEN_HOMES[what]}":
            found.append(f"{mod} line {node.lineno}: {what} belongs in {FROZEN_HOMES[what]}")
    return found


def cycles(package: Path) -> list[list[str]]:
    """The import cycles (strongly connected components of more than one module)."""
    graph: dict[str, set[str]] = {}
    for mod, target, _, _ in imports(package):
        graph.setdefault(mod, set()).add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = [stack.pop()]
            while comp[-1] != v:
                comp.append(stack.pop())
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walker_sees_the_imports_it_checks():
    """Guards the checks below against passing for want of imports: known edges are found."""
    edges = {(m, t) for m, t, _, _ in imports(PACKAGE)}
    assert ("gscfast.__main__", "gscfast.experiments") in edges  # function-local
    assert ("gscfast.compiler", "gscfast.rules.residual") in edges
    assert ("gscfast.experiments.ghost", "gscfast.theory") in edges  # relative, two dots
    assert ("gscfast.backends.cupy_backend", "gscfast.backends._gpu_host") in edges  # local


def test_library_code_never_imports_the_studies():
    assert experiments_imports(PACKAGE) == []


def test_no_study_imports_another():
    assert set(STUDIES.values()) <= set(modules(PACKAGE))
    assert study_imports(PACKAGE, set(STUDIES.values())) == []


def test_studies_share_their_recipe():
    assert recipe_bypasses(PACKAGE, set(STUDIES.values())) == []


def test_no_private_name_imported_across_modules():
    assert private_imports(PACKAGE) == []


def test_no_import_cycles():
    assert cycles(PACKAGE) == []


def test_nothing_is_keyed_by_object_identity():
    assert identity_keys(PACKAGE) == []


def test_frozen_batch_norm_has_its_two_homes_only():
    assert frozen_outside_homes(PACKAGE) == []
    # the walker finds the homes themselves, so the check above is not vacuous
    calls = {(m, getattr(n.func, "attr", getattr(n.func, "id", None))) for m, n in _calls(PACKAGE)}
    assert ("gscfast.frozen", "ForwardCtx") in calls
    assert ("gscfast.nn", "register_forward_pre_hook") in calls


@pytest.mark.parametrize(
    "files, check, expected",
    [
        (
            {"a.py": "from .b import f", "b.py": "def f():\n    from .a import g"},
            cycles,
            [["pkg.a", "pkg.b"]],
        ),
        (
            {"a.py": "from .b import _f", "b.py": "_f = 1"},
            private_imports,
            ["pkg.a line 1 imports _f from pkg.b"],
        ),
        ({"a.py": "from . import _b", "_b.py": "x = 1"}, private_imports, []),  # a private module
        ({"a.py": "stats = {id(m): 1}"}, identity_keys, ["pkg.a line 1 calls id()"]),
        (
            {
                "frozen.py": "ForwardCtx(coupled=True, record=s)",
                "nn.py": "m.register_forward_pre_hook(f)",
                "engine.py": "ForwardCtx(coupled=True, record=s)\nForwardCtx(coupled=False)",
                "reference.py": "bn.register_forward_pre_hook(f)",
            },
            frozen_outside_homes,
            [
                "pkg.engine line 1: ForwardCtx(record=...) belongs in frozen",
                "pkg.reference line 1: register_forward_pre_hook belongs in nn",
            ],
        ),
        (
            {"study.py": "from .io import atomic_write", "io.py": "atomic_write = 1"},
            lambda pkg: recipe_bypasses(pkg, {"pkg.study"}),
            ["pkg.study line 1 imports atomic_write from pkg.io"],
        ),
        (
            {
                "a.py": "from .experiments.runner import g",
                "experiments/__init__.py": "",
                "experiments/runner.py": "g = 1",
            },
            experiments_imports,
            ["pkg.a line 1 imports pkg.experiments.runner"],
        ),
        (
            {
                "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B",
                "b.py": "from .a import A",
            },
            cycles,
            [],
        ),  # annotations only: no cycle at run time
    ],
)
def test_the_checks_catch_what_they_refuse(tmp_path, files, check, expected):
    pkg = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text + "\n")
    assert check(pkg) == expected


def test_one_lowering_for_the_fused_backends():
    """Only ``backends/lowering.py`` turns rule classes into kernel input, and it is the one place
    that decides fused-or-torch-path: no other backend imports a rule class (``*Rule``) or asks
    ``.fused(`` itself."""
    backends = f"{PACKAGE.name}.backends"
    lowering = f"{backends}.lowering"
    rule_imports = [
        f"{mod} line {line} imports {name} from {target}"
        for mod, target, name, line in imports(PACKAGE)
        if mod.startswith(backends)
        and mod != lowering
        and target.startswith(f"{PACKAGE.name}.rules")
        and name is not None
        and name.endswith("Rule")
    ]
    assert rule_imports == []
    assert any(t == lowering for m, t, _, _ in imports(PACKAGE) if m.startswith(backends))
    guards = [
        f"{path.name} line {i}"
        for mod, path in modules(PACKAGE).items()
        if mod.startswith(backends) and mod != lowering
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if ".fused(" in line
    ]
    assert guards == []


def test_problem_lives_where_it_is_built():
    from gscfast import backends, validation

    assert (
        validation.Problem.__module__ == validation.make_problem.__module__ == "gscfast.validation"
    )
    assert backends.Problem is validation.Problem  # the registry's public name, one class


def numba_cache_bypasses(package: Path) -> list[str]:
    """numba's cache has one home, ``backends/numba_cache`` (the shared, content-keyed cache):
    no other module touches ``numba.core.caching``, and every ``cache=`` of a numba decorator
    is a value ``numba_cache.register`` returned, never a literal ``True`` (numba's own cache,
    per path, compiled again by every clone and environment)."""
    home = f"{package.name}.backends.numba_cache"
    found = []
    for mod, path in modules(package).items():
        if mod == home:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                names += [a.name for a in node.names]
                if any("numba.core.caching" in n or n == "caching" for n in names):
                    found.append(f"{mod} line {node.lineno} imports numba's caching")
            elif isinstance(node, ast.Call | ast.Dict):
                if isinstance(node, ast.Call):
                    pairs = [(k.arg, k.value) for k in node.keywords]
                else:
                    pairs = [
                        (k.value if isinstance(k, ast.Constant) else None, v)
                        for k, v in zip(node.keys, node.values)
                    ]
                for key, value in pairs:
                    if key == "cache" and isinstance(value, ast.Constant) and value.value is True:
                        found.append(f"{mod} line {node.lineno}: cache=True bypasses numba_cache")
    return found


def test_numba_cache_has_one_home():
    assert numba_cache_bypasses(PACKAGE) == []
    from gscfast.backends import _numba_kernels

    assert _numba_kernels.HELP["cache"] is _numba_kernels.CACHE  # the walker's subject exists


@pytest.mark.parametrize(
    "text",
    [
        "from numba import njit\n@njit(cache=True)\ndef f(x):\n    return x",
        "OPTS = dict(fastmath=True, cache=True)",
        "OPTS = {'cache': True}",
        "from numba.core.caching import _CacheLocator",
        "from numba.core import caching",
    ],
)
def test_numba_cache_check_catches_bypasses(tmp_path, text):
    pkg = tmp_path / "pkg"
    (pkg / "backends").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "backends" / "__init__.py").write_text("")
    (pkg / "backends" / "kern.py").write_text(text + "\n")
    (pkg / "backends" / "numba_cache.py").write_text(text + "\n")  # the home may
    assert len(numba_cache_bypasses(pkg)) == 1
