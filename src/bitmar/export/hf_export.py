"""Hugging Face export of a BitMar checkpoint: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.

An export directory holds
    config.json                 BitMarConfig (every ModelConfig field, packed flag, DINOv2 config) + auto_map
    configuration_bitmar.py     bitmar/model/model_config.py + templates/configuration_bitmar.py, flattened
    modeling_bitmar.py          file writes, packed CPU kernel (C++ source + loader), bitnet, memory and model sources +
                                templates/modeling_bitmar.py, flattened
    processing_bitmar.py        templates/processing_bitmar.py (tokenizer + DINOv2 image processor)
    model.safetensors           `model.*` (BitMar) and `vision_backbone.*` (optional frozen DINOv2)
    episodic_store.safetensors  the checkpoint's persistent episodic store (EpisodicStore.state_dict()), when it holds
                                episodes and --no_store is not given; the remote code loads it in from_pretrained
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
    preprocessor_config.json, processor_config.json, generation_config.json, README.md (model card)

Flattening: the remote code must run where the `bitmar` package is not installed, so the model sources are
concatenated into one file in dependency order. Each source is parsed with `ast`; its `from bitmar... import`
lines are removed (every imported name must be defined at top level by a module flattened before it), its
`from __future__` and library imports are merged into one header, and anything that cannot be flattened safely
(an import outside torch / the standard library, a `bitmar` import inside a function, a module object import,
two modules defining the same top-level name) stops the export with a message naming the file and line.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import GenerationConfig, PreTrainedTokenizerFast

from bitmar import fileio
from bitmar.bitnet import PackedBitLinear, pack_model, quantization_stats
from bitmar.config import BitMarConfig as RunConfig
from bitmar.config import ConfigError, config_from_dict
from bitmar.data.errors import DataError
from bitmar.data.tokenizer import load_tokenizer
from bitmar.fileio import check_writable_dir
from bitmar.infra.checkpoint import load_checkpoint
from bitmar.memory import EpisodicMemory, EpisodicStore
from bitmar.model.bitmar import BitMar

# Sources of the remote code, in dependency order (a module only imports names from modules listed before it).
CONFIG_SOURCES = ("bitmar.model.model_config",)
MODEL_SOURCES = (
    "bitmar.fileio",  # the crash-safe writes (kernel source, episodic store)
    "bitmar.kernels.packed_cpu_source",  # the packed CPU kernel's C++ source ...
    "bitmar.kernels.packed_cpu",  # ... and its loader: built where a compiler exists
    "bitmar.bitnet",
    "bitmar.memory",
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
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
WEIGHTS_NAME = "model.safetensors"
STORE_NAME = "episodic_store.safetensors"  # = EPISODIC_STORE_NAME of templates/modeling_bitmar.py
# Lists the files an export wrote: a re-export replaces the directory only when it holds nothing else.
EXPORT_MANIFEST = "bitmar_export.json"
# What an export written before the manifest existed may hold (tokenizer files vary between transformers versions).
LEGACY_EXPORT_FILES = frozenset(
    {
        *(f"{name}.py" for name in ("configuration_bitmar", "modeling_bitmar", "processing_bitmar")),
        WEIGHTS_NAME,
        STORE_NAME,
        "config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "processor_config.json",
        "README.md",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
    }
)
REGENERATED_FILES = frozenset({"__pycache__"})  # Python writes it when the remote code is imported from the folder

AUTO_MAP = {
    "AutoConfig": "configuration_bitmar.BitMarConfig",
    "AutoModel": "modeling_bitmar.BitMarModel",  # base model (last_hidden_state): the BabyLM fine-tuning path
    "AutoModelForCausalLM": "modeling_bitmar.BitMarForCausalLM",
    "AutoProcessor": "processing_bitmar.BitMarProcessor",
}
PROCESSOR_CONFIG = {"processor_class": "BitMarProcessor", "auto_map": {"AutoProcessor": AUTO_MAP["AutoProcessor"]}}

# facebook/dinov2-base's preprocessor_config.json: resize the short side to 256 (bicubic), center crop 224,
# scale to [0, 1], normalize with the ImageNet mean/std. Used when the backbone directory has no such file.
DINOV2_IMAGE_PROCESSOR: dict[str, Any] = {
    "image_processor_type": "BitImageProcessor",
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}


class ExportError(ValueError):
    """A checkpoint, backbone, source module or output directory the export cannot use; the message says what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Flattening
# ---------------------------------------------------------------------------------------------------------------


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
                "at top level; list the modules in dependency order (bitmar/export/hf_export.py MODEL_SOURCES)"
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


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint -> tensors, tokenizer, configs
# ---------------------------------------------------------------------------------------------------------------


def _run_config(payload: dict[str, Any], path: Path) -> RunConfig:
    if not isinstance(payload["config"], dict):
        raise ExportError(f"{path}: its 'config' entry is not a mapping; the checkpoint is not from train_bitmar.py")
    try:
        return config_from_dict(payload["config"])
    except ConfigError as err:
        raise ExportError(
            f"{path}: the config stored in the checkpoint does not load with this BitMar version ({err}); export "
            "it with the BitMar version that trained it"
        ) from None


def _load_model(payload: dict[str, Any], cfg: RunConfig, path: Path) -> BitMar:
    model = BitMar(cfg.model)
    state = payload["model"]
    if not isinstance(state, dict):
        raise ExportError(f"{path}: its 'model' entry is not a state dict")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise ExportError(
            f"{path}: the weights do not fit the model its config describes (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shape {wrong[:5]}); the checkpoint comes from different model code"
        )
    model.load_state_dict(state)
    return model.eval()


def _load_checkpoint_tokenizer(payload: dict[str, Any], cfg: RunConfig, path: Path) -> PreTrainedTokenizerFast:
    text = payload.get("tokenizer")
    if not isinstance(text, str):
        raise ExportError(
            f"{path}: the checkpoint holds no tokenizer (key 'tokenizer'); re-save it with train_bitmar.py"
        )
    with tempfile.TemporaryDirectory() as scratch:
        file = Path(scratch) / "tokenizer.json"
        file.write_text(text, encoding="utf-8")
        try:
            tokenizer = load_tokenizer(file)  # checks the special tokens and that BOS is prepended
        except DataError as err:
            raise ExportError(f"{path}: its tokenizer is unusable ({err})") from None
    if len(tokenizer) > cfg.model.vocab_size:
        raise ExportError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but model.vocab_size is {cfg.model.vocab_size}"
        )
    tokenizer.model_max_length = cfg.model.max_seq_len
    return tokenizer


def _load_backbone(name_or_path: str, cfg: RunConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen DINOv2 (`Dinov2Model`) and its image processor settings."""
    from transformers import Dinov2Model  # only exports with a backbone need it

    if not cfg.model.use_vision:
        raise ExportError("--vision_backbone: this model was trained with model.use_vision=false; it takes no pictures")
    try:
        backbone = Dinov2Model.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ExportError(
            f"--vision_backbone {name_or_path}: cannot load a DINOv2 model ({str(err).splitlines()[0][:300]}); pass a "
            "local directory saved with Dinov2Model.save_pretrained, or a hub id this machine can download "
            "(facebook/dinov2-base)"
        ) from None
    if backbone.config.hidden_size != cfg.model.vision_encoder_dim:
        raise ExportError(
            f"--vision_backbone {name_or_path}: its features are {backbone.config.hidden_size}-d but the model was "
            f"trained on {cfg.model.vision_encoder_dim}-d DINOv2 features (model.vision_encoder_dim); use the DINOv2 "
            "size that made the training features (dinov2-base: 768)"
        )
    processor = dict(DINOV2_IMAGE_PROCESSOR)
    local = Path(name_or_path) / "preprocessor_config.json"
    if local.is_file():
        processor = json.loads(local.read_text(encoding="utf-8"))
    return backbone.eval(), processor


def export_state_dict(model: BitMar, backbone: nn.Module | None, dtype: torch.dtype, packed: bool) -> dict[str, Tensor]:
    """Tensors of model.safetensors. Packs `model` in place when `packed`.

    Full-precision tensors are cast to `dtype`; the packed layers' own tensors (RMSNorm gain, scale) stay float32,
    which the remote code computes in (they are a few kB), and so does the memory prior: episodes are addressed
    against it (keys M0^+), and a bfloat16 prior would read a stored episode back inexactly. The tied LM head is the
    embedding: stored once.
    """
    if packed:
        pack_model(model)
    kept = (PackedBitLinear, EpisodicMemory)
    fp32_prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, kept))
    tensors: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point() and not key.startswith(fp32_prefixes):
            value = value.to(dtype)
        tensors[f"model.{key}"] = value.detach().contiguous()
    if backbone is not None:
        for key, value in _checkpoint_tensors(backbone).items():
            tensors[f"vision_backbone.{key}"] = (value.to(dtype) if value.is_floating_point() else value).contiguous()
    return tensors


def _checkpoint_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The tensors `model.save_pretrained` writes, under their on-disk names (which every transformers version loads).

    Not `state_dict()`: transformers 5.x renamed DINOv2's attention modules (`attention.q_proj`; 4.x:
    `attention.attention.query`) but still writes and reads the 4.x names on disk, converting on load, also for a
    DINOv2 nested in remote code. transformers 4.51.3 (BabyLM 2025 pipeline) knows only the 4.x names: with 5.x
    module names its backbone attention stayed randomly initialised.
    """
    with tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(scratch)
        tensors: dict[str, Tensor] = {}
        for file in sorted(Path(scratch).glob("*.safetensors")):
            tensors.update(load_file(str(file)))
    if not tensors:
        raise ExportError(f"{type(model).__name__}.save_pretrained wrote no safetensors file; cannot store it")
    return tensors


def checkpoint_store(payload: dict[str, Any], model: BitMar, path: Path) -> EpisodicStore | None:
    """The checkpoint's persistent store re-addressed against `model`'s memory prior, or None when it holds nothing.

    The trainer writes episodes into the store throughout phase 3 while the prior still learns, so an episode's
    stored addressing (key M0^+ with the prior of that step) no longer matches the final prior, and reading it with the
    final model would not give its value back. Every held episode (key, value) is written afresh, least recently used
    first, into a store over the final prior: the same episodes and eviction order, exact recall (ids become 0..N-1).
    """
    raw = payload.get("memory_store")
    if not raw or model.memory is None:
        return None
    saved = EpisodicStore(model.memory, device="cpu")
    try:
        if not isinstance(raw, dict):
            raise TypeError(f"a {type(raw).__name__}, not a state dict")
        saved.load_state_dict(raw)
        if len(saved) == 0:
            return None
        order = sorted(range(len(saved)), key=lambda j: (int(raw["last_used"][j]), int(raw["written_at"][j])))
        store = EpisodicStore(model.memory, capacity=max(saved.capacity, len(saved)), device="cpu")
        for j in order:
            store.write(raw["keys"][j], raw["values"][j])
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
        raise ExportError(
            f"{path}: its persistent memory store ('memory_store') does not fit the model ({type(err).__name__}: "
            f"{err}); export without it: --no_store"
        ) from None
    return store


def _save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    tokenizer.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # a class every transformers version knows
    config["model_input_names"] = ["input_ids", "attention_mask"]  # no token_type_ids for a causal LM
    config["model_max_length"] = tokenizer.model_max_length
    config["padding_side"] = "right"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------


def _numeric_leaves(data: Any, prefix: str = "") -> list[tuple[str, float]]:
    if isinstance(data, bool):
        return []
    if isinstance(data, (int, float)):
        return [(prefix, float(data))] if math.isfinite(data) else []
    if isinstance(data, dict):
        return [leaf for key, value in data.items() for leaf in _numeric_leaves(value, f"{prefix}/{key}".strip("/"))]
    return []


def find_evaluation(checkpoint_path: Path) -> tuple[Path, list[tuple[str, float]]] | None:
    """Numbers of the run's evaluation (`evaluation/results.json` of evaluate_bitmar.py, or `summary.json`), if any."""
    run_dir = checkpoint_path.parent.parent if checkpoint_path.parent.name == "checkpoints" else checkpoint_path.parent
    for candidate in (run_dir / "evaluation" / "results.json", run_dir / "summary.json"):
        if not candidate.is_file():
            continue
        try:
            data = json.loads(candidate.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            warnings.warn(
                f"{candidate} is not valid JSON ({err}); the model card has no evaluation table", stacklevel=2
            )
            continue
        # evaluate_bitmar.py puts the headline numbers under "summary" ("task/metric": value); else take them all.
        headline = data.get("summary") if isinstance(data, dict) else None
        leaves = _numeric_leaves(headline if isinstance(headline, dict) else data)
        if leaves:
            return candidate, leaves
    return None


def _format_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB ({n:,} bytes)"


def _holds_episodes(raw: Any) -> bool:
    ids = raw.get("episode_ids") if isinstance(raw, dict) else None
    return isinstance(ids, Tensor) and ids.numel() > 0


def _memory_card_line(cfg: RunConfig, store_info: dict[str, Any] | None, wanted: bool, had_store: bool) -> str:
    """The model card's paragraph on the episodic memory."""
    if not cfg.model.use_memory:
        return ""
    api = (
        "`model.memory_write(input_ids, vision_features=...)` stores an episode (caption + picture) in one shot, "
        "`model.memory_read(...)`, `memory_forget(ids)`, `memory_clear()`, and `generate(..., use_memory=True)` "
        "decodes from what a picture recalls."
    )
    if store_info is not None:
        held = f"This export carries the training run's store ({store_info['episodes']} episodes, `{STORE_NAME}`)."
    elif not wanted and had_store:
        held = "The training run's episodic store was left out (`--no_store`): the store starts empty."
    else:
        held = "The checkpoint had no stored episodes: the store starts empty."
    return f"Episodic memory: {held} {api}"


def model_card(info: dict[str, Any]) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "tags: [bitmar, bitnet-b1.58, ternary, larimar, episodic-memory, babylm, multimodal, custom_code]",
        "---",
        "",
        "# BitMar",
        "",
        "BitNet b1.58 vision-language model with a Larimar episodic memory, trained from scratch for the BabyLM",
        f"multimodal track (text + DINOv2 image features). Exported from `{info['checkpoint']}` ({info['progress']}).",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoProcessor",
        "",
        "model = AutoModelForCausalLM.from_pretrained(EXPORT_DIR, trust_remote_code=True)",
        "processor = AutoProcessor.from_pretrained(EXPORT_DIR, trust_remote_code=True)",
        'inputs = processor(text=["the cat sat on the mat"], return_tensors="pt")  # BOS is prepended',
        "logits = model(**inputs).logits  # logits[:, t] predicts input_ids[:, t + 1]",
        "```",
        "",
        "Pictures: " + info["vision"],
        "",
        *([info["memory"], ""] if info.get("memory") else []),
        "## Size",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {info['parameters']:,} |",
        f"| ternary parameters | {info['ternary_params']:,} ({100 * info['ternary_fraction']:.1f}% of all) |",
        f"| ternary storage | {info['ternary_storage']} |",
        f"| full-precision parts | {info['dtype']} |",
        f"| model.safetensors | {_format_bytes(info['weights_bytes'])} |",
        f"| same weights in float32 | {_format_bytes(info['float32_bytes'])} "
        f"({info['float32_bytes'] / max(info['weights_bytes'], 1):.2f}x larger) |",
        "",
    ]
    if info.get("evaluation"):
        source, leaves = info["evaluation"]
        lines += ["## Evaluation", "", f"From `{source}`.", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" for key, value in leaves[:80]]
        lines.append("")
    lines += ["## Training configuration", "", "```yaml", info["config_yaml"].rstrip("\n"), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _export_files(output_dir: Path) -> frozenset[str]:
    """Names a previous export in `output_dir` owns: those its manifest lists, else every name an export may write."""
    manifest = _read_json(output_dir / EXPORT_MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return frozenset({*files, EXPORT_MANIFEST})
    return LEGACY_EXPORT_FILES


def _check_output_dir(output_dir: Path) -> None:
    """Refuse, before any work, a target that is not a directory, a non-empty directory that is not a previous
    BitMar export or holds files besides one (a re-export replaces the whole directory), or one we cannot write."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"--output_dir {output_dir} exists and is not a directory; choose another path")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        config = _read_json(output_dir / "config.json")
        if not isinstance(config, dict) or config.get("model_type") != "bitmar":
            raise ExportError(
                f"--output_dir {output_dir} is not empty and holds no BitMar export; refusing to replace it — choose "
                "a new directory or empty this one"
            )
        foreign = sorted(
            p.name for p in output_dir.iterdir() if p.name not in _export_files(output_dir) | REGENERATED_FILES
        )
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ExportError(
                f"--output_dir {output_dir} holds a BitMar export and files it did not write ({shown}); a re-export "
                "replaces the whole directory and would delete them; refusing — move them out or choose another "
                "--output_dir"
            )
    try:  # the parent gets the temporary directory; an existing export is renamed away (it needs write access too)
        check_writable_dir(output_dir.parent)
        if output_dir.is_dir():
            check_writable_dir(output_dir)
    except OSError as err:
        raise ExportError(
            f"cannot write the export to {output_dir}: {err}; choose an --output_dir you can write to"
        ) from None


def export_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    packed: bool = False,
    vision_backbone: str | None = None,
    dtype: str = "bfloat16",
    store: bool = True,
) -> Path:
    """Write a Hugging Face export of a BitMar checkpoint into `output_dir` (atomically) and return its path.

    packed: store the ternary layers at 2 bits per weight (PackedBitLinear) instead of their float master weights.
    vision_backbone: DINOv2 hub id or local directory to store with the model, so `pixel_values` work.
    dtype: storage dtype of the full-precision parts ("bfloat16" or "float32").
    store: carry the checkpoint's persistent episodic store (episodic_store.safetensors) when it holds episodes.
    Raises CheckpointError (missing / corrupt checkpoint) or ExportError (anything else the user can fix).
    """
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    checkpoint_path, output_dir = Path(checkpoint_path), Path(output_dir)
    _check_output_dir(output_dir)
    payload = load_checkpoint(checkpoint_path)
    cfg = _run_config(payload, checkpoint_path)
    model = _load_model(payload, cfg, checkpoint_path)
    episodic_store = checkpoint_store(payload, model, checkpoint_path) if store else None
    tokenizer = _load_checkpoint_tokenizer(payload, cfg, checkpoint_path)
    backbone, image_processor = _load_backbone(vision_backbone, cfg) if vision_backbone else (None, None)
    remote_code = build_remote_code()
    stats = quantization_stats(model)  # before packing: counts the ternary master weights
    parameters = model.num_parameters()

    try:  # into a temporary sibling that replaces output_dir only once complete (renames only)
        with fileio.atomic_directory(output_dir) as tmp:
            for name, source in remote_code.items():
                (tmp / name).write_text(source, encoding="utf-8")
            tensors = export_state_dict(model, backbone, DTYPES[dtype], packed)
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            float32_bytes = sum(t.numel() * 4 for t in tensors.values() if t.is_floating_point())
            float32_bytes += 4 * stats["ternary_params"] if packed else 0
            del tensors
            store_info = None
            if episodic_store is not None:
                store_tensors = {k: v.detach().cpu().contiguous() for k, v in episodic_store.state_dict().items()}
                metadata = {"format": "pt", "episodes": str(len(episodic_store))}
                save_file(store_tensors, str(tmp / STORE_NAME), metadata=metadata)
                store_info = {"file": STORE_NAME, "episodes": len(episodic_store), "capacity": episodic_store.capacity}

            hf_config_class = import_generated_module(tmp / "configuration_bitmar.py").BitMarConfig
            hf_config = hf_config_class(
                **dataclasses.asdict(cfg.model),
                packed=packed,
                vision_backbone_config=backbone.config.to_dict() if backbone is not None else None,
                vision_backbone_name=vision_backbone,
                architectures=["BitMarForCausalLM"],
                auto_map=AUTO_MAP,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            hf_config.save_pretrained(str(tmp))
            config_json = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
            config_json["dtype"] = config_json["torch_dtype"] = dtype  # 5.x reads `dtype`, 4.x `torch_dtype`
            _write_json(tmp / "config.json", config_json)
            GenerationConfig(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ).save_pretrained(str(tmp))

            _save_tokenizer(tokenizer, tmp)
            _write_json(
                tmp / "preprocessor_config.json", {**(image_processor or DINOV2_IMAGE_PROCESSOR), **PROCESSOR_CONFIG}
            )
            _write_json(tmp / "processor_config.json", PROCESSOR_CONFIG)

            if vision_backbone:
                vision = (
                    "`processor(images=...)` gives `pixel_values`; the stored frozen DINOv2 "
                    f"(`{vision_backbone}`) turns them into the CLS feature (`pooler_output`) the model was trained on."
                )
            else:
                vision = (
                    "this export has no vision backbone: pass precomputed DINOv2 CLS features as "
                    f"`vision_features` (batch, {cfg.model.vision_encoder_dim}), or re-export with "
                    "`--vision_backbone facebook/dinov2-base`."
                )
            card = model_card(
                {
                    "checkpoint": checkpoint_path.name,
                    "progress": ", ".join(f"{k} {v}" for k, v in dict(payload["progress"]).items()),
                    "vision": vision,
                    "parameters": parameters,
                    "ternary_params": stats["ternary_params"],
                    "ternary_fraction": stats["ternary_fraction"],
                    "ternary_storage": "packed, 2 bits per weight (PackedBitLinear)"
                    if packed
                    else f"float master weights in {dtype}, ternarized on the fly (BitLinear)",
                    "dtype": dtype,
                    "weights_bytes": (tmp / WEIGHTS_NAME).stat().st_size,
                    "float32_bytes": float32_bytes,
                    "evaluation": find_evaluation(checkpoint_path),
                    "config_yaml": yaml.safe_dump(payload["config"], sort_keys=False),
                    "memory": _memory_card_line(cfg, store_info, store, _holds_episodes(payload.get("memory_store"))),
                }
            )
            (tmp / "README.md").write_text(card, encoding="utf-8")
            written = sorted(p.name for p in tmp.iterdir())
            manifest = {"format": 1, "files": sorted([*written, EXPORT_MANIFEST]), "episodic_store": store_info}
            _write_json(tmp / EXPORT_MANIFEST, manifest)
    except OSError as err:  # e.g. the disk filled up: the half-written export is gone, the previous one in place
        raise ExportError(f"writing the export to {output_dir} failed ({err}); nothing was changed there") from err
    return output_dir


# ---------------------------------------------------------------------------------------------------------------
# Scoring (what BLiMP-style minimal-pair evaluation computes)
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def score_sentences(model: nn.Module, tokenizer: Any, sentences: Sequence[str], batch_size: int = 32) -> Tensor:
    """Summed log-probability (float32, (N,)) of each sentence's tokens after BOS, through an exported model.

    The tokenizer prepends BOS, as lm-eval's `prefix_token_id` and the BabyLM 2025 pipeline's causal backend do;
    a minimal pair is judged correct when the good sentence scores higher. Any padding side works: a token counts
    when it and the token before it are real. Equals `bitmar.training.losses.sequence_log_probs` on the same ids.
    """
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(list(sentences[start : start + batch_size]), padding=True, return_tensors="pt")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)  # (B, T)
        first = ids.gather(1, mask.argmax(dim=1, keepdim=True)).squeeze(1)  # first real token of each row
        if bool((first != tokenizer.bos_token_id).any()):
            raise ValueError("score_sentences: the tokenizer does not prepend BOS; load the export's own tokenizer")
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        counted = (mask[:, 1:] * mask[:, :-1]).to(logp.dtype)  # (B, T-1)
        scores.append((logp * counted).sum(dim=-1).cpu())
    return torch.cat(scores) if scores else torch.zeros(0)
