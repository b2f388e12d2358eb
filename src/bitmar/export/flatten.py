"""Remote code of a Hugging Face export: the bitmar sources flattened into configuration_bitmar.py and
modeling_bitmar.py, plus the processor template.

Flattening: the remote code must run where the `bitmar` package is not installed, so the model sources are
concatenated into one file in dependency order. Each source is parsed with `ast`; its `from bitmar... import`
lines are removed (every imported name must be defined at top level by a module flattened before it), its
`from __future__` and library imports are merged into one header, and anything that cannot be flattened safely
(an import outside torch / the standard library, a `bitmar` import inside a function, a module object import,
two modules defining the same top-level name) stops the export with a message naming the file and line.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from bitmar.export.errors import ExportError

# Sources of the remote code, in dependency order (a module only imports names from modules listed before it).
CONFIG_SOURCES = ("bitmar.model.model_config",)
MODEL_SOURCES = (
    "bitmar.fileio",  # the crash-safe writes (kernel source, episodic store)
    "bitmar.kernels.packed_cpu_source",  # the packed CPU kernel's C++ source ...
    "bitmar.kernels.packed_cpu",  # ... and its loader: built where a compiler exists
    "bitmar.bitnet.quant",
    "bitmar.bitnet.int8_gemm",
    "bitmar.bitnet.layer",
    "bitmar.bitnet.packing",
    "bitmar.bitnet.packed",
    "bitmar.memory.numerics",
    "bitmar.memory.larimar",
    "bitmar.memory.store",
    "bitmar.model.layers",
    "bitmar.model.text_encoder",
    "bitmar.model.vision_encoder",
    "bitmar.model.fusion",
    "bitmar.model.decoder",
    "bitmar.model.generation",
    "bitmar.model.bitmar",
)
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
SOURCE_LIBRARIES = frozenset({"torch"})  # besides the standard library
TEMPLATE_LIBRARIES = frozenset({"torch", "transformers", "safetensors"})  # safetensors: a transformers dependency


@dataclass(frozen=True)
class _ImportEntry:
    module: str  # "torch.nn.functional", or ".configuration_bitmar" for a sibling generated file
    name: str | None  # None: `import module`
    asname: str | None

    @property
    def binding(self) -> str:
        if self.name is None:
            return self.asname or self.module.split(".")[0]
        return self.asname or self.name

    def group(self) -> int:  # 0 standard library, 1 third party, 2 sibling generated file
        if self.module.startswith("."):
            return 2
        return 0 if self.module.split(".")[0] in sys.stdlib_module_names else 1


@dataclass
class _Part:
    label: str
    summary: str  # first line of the module docstring
    body: str  # source with docstring, imports and __all__ removed
    defined: set[str]
    imports: list[_ImportEntry]
    bitmar_names: list[tuple[str, str, int]]  # (name, from module, line)
    future: set[str]


@dataclass(frozen=True)
class FlatSource:
    """A flattened module: its source and the names it defines at top level."""

    source: str
    defined: frozenset[str]


def _span(node: ast.stmt) -> tuple[int, int]:
    start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    return start, node.end_lineno or node.lineno


def _target_names(target: ast.expr) -> set[str]:
    if isinstance(target, ast.Name):
        return {target.id}
    if isinstance(target, (ast.Tuple, ast.List)):
        return set().union(*(_target_names(t) for t in target.elts)) if target.elts else set()
    if isinstance(target, ast.Starred):
        return _target_names(target.value)
    return set()  # attribute / subscript targets bind no new name


def _bound_names(node: ast.stmt) -> set[str]:
    """Names a top-level statement binds in the module namespace (descending into if / try / with blocks)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, ast.Assign):
        return set().union(*(_target_names(t) for t in node.targets))
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        return _target_names(node.target)
    names: set[str] = set()
    if isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
        blocks = [getattr(node, attr, []) for attr in ("body", "orelse", "finalbody")]
        blocks += [handler.body for handler in getattr(node, "handlers", [])]
        for block in blocks:
            for child in block:
                names |= _bound_names(child)
    return names


def _is_dunder_all(node: ast.stmt) -> bool:
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and any(
        isinstance(t, ast.Name) and t.id == "__all__" for t in targets
    )


def _library_allowed(root: str, libraries: frozenset[str]) -> bool:
    return root in sys.stdlib_module_names or root in libraries


def _analyse(label: str, text: str, libraries: frozenset[str], siblings: frozenset[str]) -> _Part:
    """Split one source file into its body, its imports and the names it defines (see the module docstring)."""
    try:
        tree = ast.parse(text, filename=label)
    except SyntaxError as err:
        raise ExportError(f"{label}:{err.lineno}: cannot parse the source ({err.msg})") from None
    removed: list[tuple[int, int]] = []
    kept: list[tuple[int, int]] = []
    top_level_imports: set[int] = set()
    part = _Part(label, "", "", set(), [], [], set())

    def refuse(node: ast.AST, why: str) -> ExportError:
        return ExportError(f"{label}:{node.lineno}: {why}; the exported remote code cannot be generated")

    for index, node in enumerate(tree.body):
        span = _span(node)
        if index == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            if isinstance(node.value.value, str):
                part.summary = node.value.value.strip().splitlines()[0] if node.value.value.strip() else ""
                removed.append(span)
                continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            top_level_imports.add(id(node))
            removed.append(span)
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                part.future.update(alias.name for alias in node.names)
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    root = alias.name.split(".")[0]
                    if root == "bitmar":
                        raise refuse(
                            node,
                            f"`import {alias.name}` binds a bitmar module (a flat file has no modules); "
                            "import the names instead (`from bitmar.x import name`)",
                        )
                    if not _library_allowed(root, libraries):
                        raise refuse(
                            node, f"imports `{alias.name}`, outside {sorted(libraries)} and the standard library"
                        )
                    part.imports.append(_ImportEntry(alias.name, None, alias.asname))
                continue
            module = node.module or ""
            if node.level:
                if node.level != 1 or module not in siblings:
                    raise refuse(
                        node,
                        f"relative import `from {'.' * node.level}{module}` is not a generated sibling "
                        f"module ({sorted(siblings)})",
                    )
                for alias in node.names:
                    part.imports.append(_ImportEntry(f".{module}", alias.name, alias.asname))
                continue
            root = module.split(".")[0]
            for alias in node.names:
                if alias.name == "*":
                    raise refuse(node, f"`from {module} import *` hides which names the file needs")
                if root == "bitmar":
                    if alias.asname not in (None, alias.name):
                        raise refuse(
                            node,
                            f"`from {module} import {alias.name} as {alias.asname}` renames a bitmar "
                            "name; import it under its own name",
                        )
                    part.bitmar_names.append((alias.name, module, node.lineno))
                elif _library_allowed(root, libraries):
                    part.imports.append(_ImportEntry(module, alias.name, alias.asname))
                else:
                    raise refuse(node, f"imports from `{module}`, outside {sorted(libraries)} and the standard library")
            continue
        if _is_dunder_all(node):
            removed.append(span)
            continue
        kept.append(span)
        part.defined |= _bound_names(node)

    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top_level_imports:
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or "."]
            for name in names:
                root = name.split(".")[0]
                if getattr(node, "level", 0) or root == "bitmar" or not _library_allowed(root, libraries):
                    raise refuse(
                        node,
                        f"nested import of `{name}` (inside a function or block) cannot be resolved in "
                        "a flat file; import torch / standard-library modules only, or move it to the top",
                    )
    for start, end in removed:
        for k_start, k_end in kept:
            if start <= k_end and k_start <= end:
                raise ExportError(
                    f"{label}:{start}: an import shares a line with other code (`;`); put it on its "
                    "own line so it can be removed"
                )
    drop = {line for start, end in removed for line in range(start, end + 1)}
    lines = text.splitlines(keepends=True)
    part.body = "".join(line for number, line in enumerate(lines, start=1) if number not in drop).strip("\n")
    return part


def _import_lines(entries: Sequence[_ImportEntry]) -> list[str]:
    lines: list[str] = []
    for group in (0, 1, 2):
        members = [e for e in entries if e.group() == group]
        plain = sorted({e for e in members if e.name is None}, key=lambda e: (e.module, e.asname or ""))
        lines += [f"import {e.module}" + (f" as {e.asname}" if e.asname else "") for e in plain]
        by_module: dict[str, set[str]] = {}
        for e in members:
            if e.name is not None:
                by_module.setdefault(e.module, set()).add(e.name + (f" as {e.asname}" if e.asname else ""))
        lines += [f"from {module} import {', '.join(sorted(names))}" for module, names in sorted(by_module.items())]
        if members:
            lines.append("")
    return lines


# Mirrors transformers 4.x `check_imports`, which scans lines (docstrings included) rather than the syntax tree.
_LINE_IMPORT = re.compile(r"^\s*(?:import\s+(\S+)\s*$|from\s+(\S+)\s+import)", re.MULTILINE)


def flatten_sources(
    parts: Sequence[tuple[str, str, frozenset[str]]],
    header: str,
    provided: dict[str, str] | None = None,
    siblings: frozenset[str] = frozenset(),
) -> FlatSource:
    """Concatenate `(label, source text, allowed libraries)` parts into one module (see the module docstring).

    `provided` maps names defined by a sibling generated module to that module's name: a `bitmar` import of such a
    name becomes `from .<module> import name`. Raises ExportError for anything that cannot be flattened safely.
    """
    provided = provided or {}
    defined_by: dict[str, str] = {}
    bindings: dict[str, _ImportEntry] = {}
    future: set[str] = set()
    libraries: frozenset[str] = frozenset()
    analysed: list[_Part] = []

    def bind(entry: _ImportEntry, label: str) -> None:
        previous = bindings.setdefault(entry.binding, entry)
        if previous != entry:
            raise ExportError(
                f"{label}: the name {entry.binding!r} is imported as {entry} here but as {previous} in an earlier "
                "module; flattened into one file they would clash — use the same import in both"
            )

    for label, text, allowed in parts:
        part = _analyse(label, text, allowed, siblings)
        libraries |= allowed
        for name, module, line in part.bitmar_names:
            if name in defined_by:
                continue
            if name in provided:
                bind(_ImportEntry(f".{provided[name]}", name, None), label)
                continue
            raise ExportError(
                f"{label}:{line}: imports {name!r} from {module}, but no module flattened before it defines {name!r} "
                "at top level; list the modules in dependency order (bitmar/export/flatten.py MODEL_SOURCES)"
            )
        for entry in part.imports:
            bind(entry, label)
        for name in sorted(part.defined):
            if name in defined_by:
                raise ExportError(
                    f"the top-level name {name!r} is defined in both {defined_by[name]} and {label}; in one flat file "
                    "the second would silently replace the first — rename one of them"
                )
            defined_by[name] = label
        future |= part.future
        analysed.append(part)
    clashes = sorted(set(defined_by) & set(bindings))
    if clashes:
        raise ExportError(
            f"top-level names {clashes} are defined in one source ({defined_by[clashes[0]]}) and imported in another; "
            "rename the definition"
        )

    out = [header.strip("\n"), ""]
    if future:
        out += [f"from __future__ import {', '.join(sorted(future))}", ""]
    out += _import_lines(list(bindings.values()))
    for part in analysed:
        banner = f"# {'-' * 113}\n# {part.label}" + (f": {part.summary}" if part.summary else "")
        out += ["", banner, f"# {'-' * 113}", "", part.body, ""]
    source = re.sub(r"\n{4,}", "\n\n\n", "\n".join(out)).rstrip("\n") + "\n"

    try:
        compile(source, "<flattened>", "exec")
    except SyntaxError as err:  # a bug in the flattener, not in the user's input
        raise ExportError(f"the flattened source does not compile (line {err.lineno}: {err.msg})") from None
    for match in _LINE_IMPORT.finditer(source):
        module = match.group(1) or match.group(2)
        root = module.split(".")[0]
        if module.startswith(".") or root in ("", "__future__"):
            continue
        if not _library_allowed(root, libraries):
            line = source.count("\n", 0, match.start()) + 1
            raise ExportError(
                f"line {line} of the flattened source reads like an import of {module!r} (transformers 4.x scans "
                "lines, docstrings included, and would require that package); reword that line in its source file"
            )
    return FlatSource(source, frozenset(defined_by))


def _module_source(module: str) -> tuple[str, str]:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ExportError(f"source module {module} is not importable; reinstall bitmar (pip install -e .)")
    return module.replace(".", "/") + ".py", Path(spec.origin).read_text(encoding="utf-8")


def _template(name: str) -> tuple[str, str]:
    path = TEMPLATES_DIR / name
    if not path.is_file():
        raise ExportError(f"template {path} is missing; reinstall bitmar (pip install -e .)")
    return f"bitmar/export/templates/{name}", path.read_text(encoding="utf-8")


def _header(kind: str, labels: Sequence[str]) -> str:
    listed = "\n".join(f"    {label}" for label in labels)
    return (
        f'"""BitMar {kind} for Hugging Face `trust_remote_code`, written by `python -m bitmar.export`.\n\n'
        "Do not edit: re-export instead. Flattened in this order from the bitmar sources below, with the `bitmar`\n"
        f"imports removed, so it runs with torch and transformers alone:\n{listed}\n"
        '"""'
    )


def build_remote_code() -> dict[str, str]:
    """Source text of configuration_bitmar.py, modeling_bitmar.py and processing_bitmar.py."""
    config_parts = [(*_module_source(m), SOURCE_LIBRARIES) for m in CONFIG_SOURCES]
    config_parts.append((*_template("configuration_bitmar.py"), TEMPLATE_LIBRARIES))
    config = flatten_sources(config_parts, _header("configuration", [p[0] for p in config_parts]))
    model_parts = [(*_module_source(m), SOURCE_LIBRARIES) for m in MODEL_SOURCES]
    model_parts.append((*_template("modeling_bitmar.py"), TEMPLATE_LIBRARIES))
    modeling = flatten_sources(
        model_parts,
        _header("model code", [p[0] for p in model_parts]),
        provided=dict.fromkeys(config.defined, "configuration_bitmar"),
        siblings=frozenset({"configuration_bitmar"}),
    )
    processing_part = (*_template("processing_bitmar.py"), TEMPLATE_LIBRARIES)
    processing = flatten_sources([processing_part], _header("processor", [processing_part[0]]))
    return {
        "configuration_bitmar.py": config.source,
        "modeling_bitmar.py": modeling.source,
        "processing_bitmar.py": processing.source,
    }


def import_generated_module(path: str | os.PathLike, name: str | None = None) -> ModuleType:
    """Import a generated, self-contained file (configuration_bitmar.py) under a unique module name."""
    path = Path(path)
    name = name or f"_bitmar_export_{path.stem}_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ExportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class body runs
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module
