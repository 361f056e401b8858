"""Code fingerprints: a digest of exactly the code a stage's runner reaches, so other code changes recompute nothing.

A fingerprint starts at one function and follows every name it uses to the top-level definition behind it
(function, class, constant) in metareward's own modules, through imports (function-level ones too) and
module attributes (`models.resolve_model`), until nothing new is reached. Each definition is hashed as its
syntax tree without docstrings, comments or annotations, so neither a comment, a docstring, a type hint nor
reformatting changes a fingerprint, and the tree is written out field by field, so the same code gives the
same digest on every Python version we support. Code outside metareward (polars, torch, TRL, vLLM) is not
hashed: a stage's `version` in the registry is bumped by hand when a library's behaviour changes its rows.

Method calls on objects (`backend.generate(...)`) are reached through the class that made the object:
`create_backend` names every backend class, so their methods are hashed. A runner must therefore reach its
engine or helper by naming it, not through an argument whose class it never names.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

PACKAGE = "metareward"

NOT_FOLLOWED = {
    "metareward.config.campaign": "its values, not its code, decide a stage's rows, and every key hashes the values it "
                                  "reads",
    "metareward.artifacts.stats": "bookkeeping: counts go to markers and manifests, never into a stage's table",
    "metareward.artifacts.store": "moves bytes: what a stage reads is identified by the digests of its input tables",
}
"""Modules a fingerprint does not enter, and why."""

_SKIPPED_FIELDS = {"annotation", "returns", "type_comment", "type_params"}


@dataclass
class _Module:
    """One parsed module: its top-level definitions and what its top-level names import."""

    name: str
    package: str
    definitions: dict[str, ast.AST] = field(default_factory=dict)
    imports: dict[str, tuple[str, str | None]] = field(default_factory=dict)


class CodeIndex:
    """Fingerprints over the metareward sources found under `root` (the folder that holds the package)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._modules: dict[str, _Module | None] = {}

    def fingerprint(self, roots: Iterable[tuple[str, str]]) -> str:
        """A 16-hex-digit digest of every definition reachable from the (module, name) roots."""
        return hashlib.blake2b("\n".join(self.reached(roots)).encode(), digest_size=8).hexdigest()

    def reached(self, roots: Iterable[tuple[str, str]]) -> list[str]:
        """The canonical text of every reachable definition, "name:tree", sorted: where a definition lives is not
        part of it, so moving code between modules recomputes nothing."""
        pending = list(roots)
        seen: set[tuple[str, str]] = set()
        pieces = []
        while pending:
            module_name, name = pending.pop()
            if (module_name, name) in seen or module_name in NOT_FOLLOWED:
                continue
            seen.add((module_name, name))
            module = self._module(module_name)
            if module is None:
                continue
            if name in module.definitions:
                node = module.definitions[name]
                pieces.append(f"{name}:{_canonical(node)}")
                pending.extend(self._references(node, module))
            elif name in module.imports:  # re-exported, e.g. a package's __init__
                pending.append(self._target(*module.imports[name]))
            elif self._module(f"{module_name}.{name}") is not None:  # a submodule named as an attribute
                continue
        return sorted(pieces)

    def _references(self, node: ast.AST, module: _Module) -> Iterator[tuple[str, str]]:
        local = dict(module.imports)
        for child in _walk(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for alias, target in _imports(child, module.package):
                    local[alias] = target
                    if target[1] is not None:
                        yield self._target(*target)
        for child in _walk(node):
            if isinstance(child, ast.Attribute):
                dotted = _dotted(child)
                if dotted and dotted[0] in local:
                    module_name, attribute = local[dotted[0]]
                    yield from self._attribute_chain(module_name, attribute, dotted[1:])
            elif isinstance(child, ast.Name):
                if child.id in module.definitions:
                    yield module.name, child.id
                elif child.id in local and local[child.id][1] is not None:
                    yield self._target(*local[child.id])

    def _attribute_chain(self, module_name: str, attribute: str | None, rest: list[str]) -> Iterator[tuple[str, str]]:
        # `import metareward.training.models as models; models.x` or `from metareward import models; models.x`.
        path = module_name if attribute is None else f"{module_name}.{attribute}"
        if self._module(path) is None:
            if attribute is not None:
                yield module_name, attribute
            return
        for part in rest:
            if self._module(f"{path}.{part}") is None:
                yield path, part
                return
            path = f"{path}.{part}"

    def _target(self, module_name: str, name: str | None) -> tuple[str, str]:
        if name is not None and self._module(f"{module_name}.{name}") is not None:
            return f"{module_name}.{name}", ""
        return module_name, name or ""

    def _module(self, name: str) -> _Module | None:
        if name not in self._modules:
            self._modules[name] = self._parse(name)
        return self._modules[name]

    def _parse(self, name: str) -> _Module | None:
        if name != PACKAGE and not name.startswith(PACKAGE + "."):
            return None
        base = self.root.joinpath(*name.split("."))
        path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if not path.is_file():
            return None
        module = _Module(name, package=name if path.name == "__init__.py" else name.rpartition(".")[0])
        for statement in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
            if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                module.definitions[statement.name] = statement
            elif isinstance(statement, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
                for target in targets:
                    for named in ast.walk(target):
                        if isinstance(named, ast.Name):
                            module.definitions[named.id] = statement
            elif isinstance(statement, (ast.Import, ast.ImportFrom)):
                module.imports.update(_imports(statement, module.package))
        return module


def _imports(statement: ast.Import | ast.ImportFrom, package: str):
    """(local name, (module, attribute or None)) for each name an import statement binds; relative imports
    are resolved against `package` (the importing module's package)."""
    if isinstance(statement, ast.Import):
        for alias in statement.names:
            if alias.asname:
                yield alias.asname, (alias.name, None)
            else:
                yield alias.name.split(".")[0], (alias.name.split(".")[0], None)
        return
    base = statement.module or ""
    if statement.level:
        parts = package.split(".")
        anchor = parts[: len(parts) - statement.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    for alias in statement.names:
        yield alias.asname or alias.name, (base, alias.name)


def _dotted(node: ast.Attribute) -> list[str]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return []
    return [node.id, *reversed(parts)]


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """Every node under `node` except annotations (they do not run)."""
    yield node
    for name, value in ast.iter_fields(node):
        if name in _SKIPPED_FIELDS:
            continue
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, ast.AST):
                yield from _walk(child)


def _canonical(node) -> str:
    """The tree as text: node types and fields, without docstrings, annotations, positions or empty fields."""
    if isinstance(node, list):
        return "[" + ",".join(_canonical(item) for item in node) + "]"
    if not isinstance(node, ast.AST):
        return repr(node)
    fields = []
    for name, value in ast.iter_fields(node):
        if name in _SKIPPED_FIELDS or value is None or value == []:
            continue
        if name == "body" and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            value = _without_docstring(value)
        fields.append(f"{name}={_canonical(value)}")
    return f"{type(node).__name__}({','.join(fields)})"


def _without_docstring(body: list[ast.stmt]) -> list[ast.stmt]:
    first = body[0] if body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return body[1:]
    return body


@lru_cache(maxsize=1)
def installed_index() -> CodeIndex:
    """The index of the metareward sources this process runs (parsed once per process)."""
    return CodeIndex(Path(__file__).resolve().parents[1])
