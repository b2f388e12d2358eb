"""Packed ternary CPU kernel: BitLinear's eval product computed straight from 2-bit packed weights.

`packed_ternary_linear(y, packed, out_features, gamma, bias, q_max)` quantizes the (already normalised) float32
activations y (N, in) to int8 per row exactly as BitLinear does (s = max(max|y|, 1e-5) / q_max, codes round(y / s),
half to even), multiplies them with the ternary weights read from `pack_ternary`'s bytes (row-major, 4 codes per
byte, code = w + 1) in exact integer arithmetic, and returns acc * (s * gamma) + bias with the reference's roundings:
the same bits as `BitLinear` eval, without a float (or int8) copy of the weight. The 2-bit codes are unpacked in
registers (shift + mask) and multiplied by AVX-512 VNNI (`vpdpbusd`) or AVX2 (`vpmaddubsw`) instructions; a scalar
loop is the portable path. Rows >= `PACKED_GEMM_MIN_ROWS` (prefill, evaluation batches) unpack a 256-row tile of
the weight at a time to float32 and use BLAS (exact: integer sums stay below 2^24), so transient memory is bounded.

Build: the C++ source (`packed_cpu_source.PACKED_KERNEL_CPP`) is compiled once per machine at first use with
`torch.utils.cpp_extension` (g++/clang and ninja; `pip install -r requirements.txt` installs ninja) into
`$TORCH_EXTENSIONS_DIR` or `~/.cache/bitmar/kernels` (`$XDG_CACHE_HOME/bitmar/kernels`), keyed by a hash of the
source, flags, torch and Python version; later processes load the cached library without compiling. Where it cannot
build (no compiler, no ninja, unwritable cache), PackedBitLinear falls back to its exact pure-torch path and one
warning line says why.

Route (decided once per process, at first use): `BITMAR_PACKED_KERNEL=auto|on|off` (default auto: every ISA the CPU
and compiler support is first checked bit for bit against the pure-torch reference, then the fastest is timed
against the pure-torch float route at decoding shapes, ~0.1 s; on: the kernel without measuring; off: pure torch)
and `BITMAR_PACKED_ISA=auto|avx512|avx2|scalar` (force one instruction set, e.g. to test the AVX2 path on an
AVX-512 machine). `set_packed_kernel` / `packed_kernel_mode` override both in code; `packed_kernel_decision()` says
what was chosen and why, and the decision is logged once (logger `bitmar.kernels`).

The Hugging Face export flattens this file, its C++ source (`packed_cpu_source`) and `bitmar.fileio` into the remote
code, so an exported model builds and uses the same kernel where a compiler exists and runs the pure-torch path where
none does: import nothing else from bitmar here.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bitmar.fileio import atomic_file
from bitmar.kernels.packed_cpu_source import PACKED_KERNEL_CPP

PACKED_KERNEL_ENV = "BITMAR_PACKED_KERNEL"  # auto (default: checked and measured) | on | off
PACKED_ISA_ENV = "BITMAR_PACKED_ISA"  # auto (default: fastest exact) | avx512 | avx2 | scalar
PACKED_KERNEL_MODES = ("auto", "on", "off")
PACKED_ISAS = ("avx512", "avx2", "scalar")  # widest first; avx512 means AVX-512 F+BW+VNNI
_PACKED_ISA_CODES = {"scalar": 0, "avx2": 1, "avx512": 2}  # the C++ side's numbering
# From this many rows a call unpacks weight tiles for BLAS instead of the register kernel (measured on a 2-core
# Xeon: the register kernel was faster at every size up to 1024 rows, the tiles at most tie from there on).
PACKED_GEMM_MIN_ROWS = 1024
# The probe: decoding shapes (one sequence and a batch of 8 through a 768 -> 2048 layer), alternating candidates.
PACKED_PROBE_SHAPE = (768, 2048)
PACKED_PROBE_ROWS = (1, 8)
PACKED_PROBE_REPEATS = 5
PACKED_PROBE_BUDGET_S = 0.3
_PACKED_CFLAGS = ("-O3", "-ffp-contract=off", "-fno-fast-math", "-fopenmp")  # no FMA contraction: exact roundings
_PACKED_LDFLAGS = ("-fopenmp",)  # torch's own libgomp (same soname): at::parallel_for follows torch.set_num_threads

_PACKED_STALE_LOCK_S = 600  # a build takes ~20-35 s; a lock this old belongs to a dead process

_packed_log = logging.getLogger("bitmar.kernels")

_PACKED: dict[str, Any] = {
    "mode": None,  # set_packed_kernel; None: the environment variables
    "isa": None,
    "loaded": None,  # None: not tried yet; True / False after the first attempt
    "load_error": "",
    "library": "",
    "decision": None,
    "use": None,  # the decision's verdict for the current settings
    "isa_code": 0,
    "probe": None,
    "logged": False,
    "op": None,  # torch.ops.bitmar_packed.linear.default once loaded
}


def packed_kernel_cache_dir() -> Path:
    """Where the compiled kernel lives: $TORCH_EXTENSIONS_DIR, else $XDG_CACHE_HOME/bitmar/kernels (~/.cache)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "bitmar" / "kernels"


def _packed_build_name() -> str:
    key = "\n".join([PACKED_KERNEL_CPP, *_PACKED_CFLAGS, *_PACKED_LDFLAGS, torch.__version__, sys.version])
    return "bitmar_packed_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _packed_compile(build_dir: Path, name: str) -> None:
    """Compile with torch.utils.cpp_extension (imported here: it needs setuptools, which a deployment may lack)."""
    from torch.utils import cpp_extension

    lock = build_dir / "lock"  # torch's build lock: one left by a process killed mid-build would block forever
    if lock.exists() and time.time() - lock.stat().st_mtime > _PACKED_STALE_LOCK_S:
        lock.unlink(missing_ok=True)
    source = build_dir / "bitmar_packed.cpp"
    if not source.is_file() or source.read_text() != PACKED_KERNEL_CPP:
        with atomic_file(source, suffix=".cpp") as tmp:  # a concurrent build never reads half a file
            tmp.write_text(PACKED_KERNEL_CPP)
    # ninja from `pip install ninja` sits next to this interpreter even when the environment is not activated
    scripts = sysconfig.get_path("scripts")
    path = os.environ.get("PATH", "")
    if scripts and scripts not in path.split(os.pathsep):
        os.environ["PATH"] = path + os.pathsep + scripts if path else scripts
    cpp_extension.load(
        name,
        [str(source)],
        extra_cflags=list(_PACKED_CFLAGS),
        extra_ldflags=list(_PACKED_LDFLAGS),
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )


def _packed_registered() -> bool:
    try:
        torch.ops.bitmar_packed.supported_isas  # noqa: B018 - raises when no library registered the operator
    except (AttributeError, RuntimeError):
        return False
    return True


def packed_kernel_available() -> bool:
    """Whether the compiled kernel is loaded in this process (building or loading it on the first call).

    A failure (no compiler, no ninja, unwritable cache) is remembered with its reason (`packed_kernel_decision()`)
    and logged once; it never raises: PackedBitLinear then runs its pure-torch path.
    """
    state = _PACKED
    if state["loaded"] is None:
        state["loaded"] = False
        name = _packed_build_name()
        build_dir = packed_kernel_cache_dir() / name
        library = build_dir / f"{name}.so"
        marker = build_dir / "built.ok"  # written after a complete build: a half-linked library is never loaded
        try:
            if _packed_registered():  # loaded already (the package and an exported model in one process)
                pass
            elif not (marker.is_file() and library.is_file()):
                build_dir.mkdir(parents=True, exist_ok=True)
                _packed_compile(build_dir, name)
                marker.write_text(name + "\n")
            else:
                torch.ops.load_library(str(library))
            torch.ops.bitmar_packed.supported_isas()  # the library registered its operators
            state["loaded"], state["library"] = True, str(library)
            state["op"] = torch.ops.bitmar_packed.linear.default  # resolved once: decoding calls it per layer
        except Exception as err:  # noqa: BLE001 - any build/load failure means "use the pure-torch path"
            lines = [line for line in str(err).splitlines() if line.strip()]
            state["load_error"] = f"{type(err).__name__}: {lines[0][:300] if lines else ''}"
    return bool(state["loaded"])


def _packed_parse(value: str | None, allowed: tuple[str, ...], what: str, meaning: str) -> str | None:
    if value is None or not str(value).strip():
        return None
    choice = str(value).strip().lower()
    if choice not in allowed:
        raise ValueError(f"{what}={value!r} is not one of {', '.join(allowed)}: {meaning}")
    return choice


_PACKED_MODE_MEANING = (
    "auto checks the packed CPU kernel bit for bit and measures it against pure torch (the default), on uses it "
    "without measuring, off always takes the pure-torch path (same results either way)"
)
_PACKED_ISA_MEANING = "auto takes the fastest exact one the CPU supports; the others force one instruction set"


def set_packed_kernel(mode: bool | str | None, isa: str | None = None) -> None:
    """Choose PackedBitLinear's CPU route: "auto"/True (default), "on", "off"/False, None (environment again);
    `isa`: "auto", "avx512", "avx2", "scalar" or None (environment). Overrides BITMAR_PACKED_KERNEL / _ISA."""
    if isinstance(mode, bool):
        mode = "auto" if mode else "off"
    _PACKED["mode"] = _packed_parse(mode, PACKED_KERNEL_MODES, "set_packed_kernel", _PACKED_MODE_MEANING)
    _PACKED["isa"] = _packed_parse(isa, ("auto", *PACKED_ISAS), "set_packed_kernel isa", _PACKED_ISA_MEANING)
    _PACKED["decision"] = _PACKED["use"] = None  # decided again at the next use (the probe is kept)


@contextlib.contextmanager
def packed_kernel_mode(mode: bool | str | None, isa: str | None = None) -> Iterator[None]:
    """`set_packed_kernel(mode, isa)` inside the block; the previous settings afterwards."""
    saved = (_PACKED["mode"], _PACKED["isa"])
    set_packed_kernel(mode, isa)
    try:
        yield
    finally:
        _PACKED["mode"], _PACKED["isa"] = saved
        _PACKED["decision"] = _PACKED["use"] = None


def _packed_settings() -> tuple[str, str, str]:
    """(mode, isa, where they came from); malformed environment values raise ValueError naming the choices."""
    if _PACKED["mode"] is not None or _PACKED["isa"] is not None:
        source = "set_packed_kernel"
    else:
        source = "environment" if os.environ.get(PACKED_KERNEL_ENV) or os.environ.get(PACKED_ISA_ENV) else "default"
    mode = _PACKED["mode"] or _packed_parse(
        os.environ.get(PACKED_KERNEL_ENV), PACKED_KERNEL_MODES, PACKED_KERNEL_ENV, _PACKED_MODE_MEANING
    )
    isa = _PACKED["isa"] or _packed_parse(
        os.environ.get(PACKED_ISA_ENV), ("auto", *PACKED_ISAS), PACKED_ISA_ENV, _PACKED_ISA_MEANING
    )
    return mode or "auto", isa or "auto", source


def packed_supported_isas() -> list[str]:
    """Instruction sets of the kernel this CPU and compiler support, widest first ([] when the kernel is not built)."""
    if not packed_kernel_available():
        return []
    codes = set(torch.ops.bitmar_packed.supported_isas())
    return [isa for isa in PACKED_ISAS if _PACKED_ISA_CODES[isa] in codes]


def _packed_unpack(packed: Tensor, out_features: int, in_features: int) -> Tensor:  # -> (out, in) float32 in {-1,0,1}
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    codes = ((packed.unsqueeze(1) >> shifts) & 3).reshape(-1)[: out_features * in_features]
    return codes.view(out_features, in_features).float().sub_(1)


def packed_linear_reference(
    y: Tensor, w_ternary: Tensor, gamma: Tensor, bias: Tensor | None, q_max: int
) -> Tensor:  # (N, in) float32, (out, in) float32 ternary -> (N, out) float32
    """The pure-torch product the kernel must reproduce bit for bit (BitLinear eval's ops, float32 GEMM)."""
    scale = y.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-5).div_(q_max)  # (N, 1)
    acc = (y / scale).round_().mm(w_ternary.t())
    acc.mul_(scale * gamma)
    if bias is not None:
        acc.add_(bias)
    return acc


def _packed_call(y: Tensor, packed: Tensor, out_features: int, gamma: Tensor, bias: Tensor | None, q_max: int,
                 isa: int, gemm_min_rows: int = PACKED_GEMM_MIN_ROWS) -> Tensor:  # fmt: skip
    return torch.ops.bitmar_packed.linear(y, packed, out_features, gamma, bias, q_max, isa, gemm_min_rows)


def _packed_self_test(isa: int) -> str | None:
    """None when `isa` reproduces the reference bit for bit on odd shapes (both the register and the GEMM path)."""
    gen = torch.Generator().manual_seed(0)
    for rows, n_in, n_out, with_bias in ((1, 37, 19, True), (5, 130, 67, False), (3, 257, 9, True)):
        y = torch.randn(rows, n_in, generator=gen) * 3
        w = torch.randint(-1, 2, (n_out, n_in), generator=gen)
        packed = _packed_pack(w)
        gamma = torch.rand((), generator=gen) + 0.01
        bias = torch.randn(n_out, generator=gen) if with_bias else None
        ref = packed_linear_reference(y, w.float(), gamma, bias, 127)
        for gemm_rows in (1, 1 << 30):
            out = _packed_call(y, packed, n_out, gamma, bias, 127, isa, gemm_rows)
            if not torch.equal(out, ref):
                diff = float((out - ref).abs().max())
                return f"differs from the pure-torch reference on {rows}x{n_in}->{n_out} (max |diff| {diff:.3g})"
    return None


def _packed_pack(w: Tensor) -> Tensor:  # ternary (any shape) -> pack_ternary's bytes (self-contained for the probe)
    codes = (w.reshape(-1).to(torch.int16) + 1).to(torch.uint8)
    pad = (-codes.numel()) % 4
    if pad:
        codes = torch.cat([codes, torch.ones(pad, dtype=torch.uint8)])
    place = torch.tensor([1, 4, 16, 64], dtype=torch.uint8)
    return (codes.view(-1, 4) * place).sum(dim=1, dtype=torch.uint8)


def probe_packed_kernel(candidates: list[str]) -> dict[str, Any]:
    """Time each exact ISA in `candidates` and the pure-torch float route at decoding shapes, alternating.

    Returns {"isa": fastest ISA or None when pure torch is faster, "ms": {candidate: fastest round over
    PACKED_PROBE_ROWS, ms}, "shape", "threads", "seconds"}.
    """
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    n_in, n_out = PACKED_PROBE_SHAPE
    w = torch.randint(-1, 2, (n_out, n_in), generator=gen, dtype=torch.int8)  # int8: small transient memory
    packed, w_float, gamma = _packed_pack(w), w.float(), torch.tensor(0.05)
    inputs = [torch.randn(rows, n_in, generator=gen) for rows in PACKED_PROBE_ROWS]
    fns: dict[str, Any] = {"torch": lambda y: packed_linear_reference(y, w_float, gamma, None, 127)}
    for isa in candidates:
        fns[isa] = lambda y, code=_PACKED_ISA_CODES[isa]: _packed_call(y, packed, n_out, gamma, None, 127, code)
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for k in range(PACKED_PROBE_REPEATS + 1):  # round 0 is a warm-up
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for y in inputs:
                    fn(y)
                if k:
                    times[name].append(time.perf_counter() - t0)
            if k and time.perf_counter() - start > PACKED_PROBE_BUDGET_S:
                break
    # the fastest call: background load only adds time, and it must not decide (on a busy 2-core machine a median
    # picked pure torch because the other processes' bursts happened to hit the kernel's turns)
    ms = {name: round(min(t) * 1e3, 4) for name, t in times.items()}
    best = min(candidates, key=lambda isa: ms[isa]) if candidates else None
    return {
        "isa": best if best is not None and ms[best] < ms["torch"] else None,
        "ms": ms,
        "shape": f"{'/'.join(map(str, PACKED_PROBE_ROWS))} rows x {n_in}->{n_out}",
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - start, 4),
    }


def packed_kernel_decision() -> dict[str, Any]:
    """Whether PackedBitLinear uses the packed kernel on CPU, with which ISA, and why (deciding now if needed).

    Returns {"use", "isa", "reason", "mode", "isa_setting", "source", "available", "load_error", "library",
    "supported_isas", "excluded" ({isa: why}), "probe"}. Raises ValueError for malformed switches and
    RuntimeError when BITMAR_PACKED_KERNEL=on but the kernel cannot be built or the forced ISA is unsupported.
    """
    state = _PACKED
    if state["decision"] is not None:
        return dict(state["decision"])
    mode, isa_setting, source = _packed_settings()
    available = mode != "off" and packed_kernel_available()
    supported = packed_supported_isas() if available else []
    excluded: dict[str, str] = {}
    probe = None
    isa: str | None = None
    if mode == "off":
        reason = f"packed kernel switched off ({source})"
    elif not available:
        reason = f"packed kernel not built ({state['load_error']})"
        if mode == "on":
            raise RuntimeError(f"{PACKED_KERNEL_ENV}=on but the packed CPU kernel could not be built: {reason}")
    else:
        wanted = list(supported) if isa_setting == "auto" else [isa_setting]
        if isa_setting != "auto" and isa_setting not in supported:
            raise ValueError(
                f"{PACKED_ISA_ENV}={isa_setting} is not supported by this CPU or compiler (supported: "
                f"{', '.join(supported)}); choose one of those or auto"
            )
        if mode == "on":
            isa = wanted[0]
            reason = f"packed kernel forced on ({source}), {isa}, not measured"
        else:
            for name in wanted:
                why = _packed_self_test(_PACKED_ISA_CODES[name])
                if why is not None:
                    excluded[name] = why
            exact = [name for name in wanted if name not in excluded]
            # the scalar loop only stands in for a missing vector ISA (or when forced): never timed against one
            timed = [name for name in exact if name != "scalar"] or exact
            if not timed:
                reason = "no exact packed kernel on this CPU: " + "; ".join(f"{k}: {v}" for k, v in excluded.items())
            else:
                if state["probe"] is None or state["probe"]["candidates"] != timed:
                    state["probe"] = {**probe_packed_kernel(timed), "candidates": timed}
                probe = state["probe"]
                isa = probe["isa"]
                ms = ", ".join(f"{k} {v:.3g} ms" for k, v in probe["ms"].items())
                reason = f"measured {ms} per {probe['shape']} ({probe['threads']} thread(s)): " + (
                    f"{isa} is the fastest" if isa else "pure torch is faster"
                )
    state["use"] = isa is not None
    state["isa_code"] = _PACKED_ISA_CODES[isa] if isa else 0
    state["decision"] = {
        "use": isa is not None,
        "isa": isa,
        "reason": reason,
        "mode": mode,
        "isa_setting": isa_setting,
        "source": source,
        "available": available,
        "load_error": state["load_error"],
        "library": state["library"],
        "supported_isas": supported,
        "excluded": excluded,
        "probe": dict(probe) if probe else None,
    }
    if not state["logged"]:  # one line per process
        state["logged"] = True
        level = logging.WARNING if mode != "off" and not isa else logging.INFO
        _packed_log.log(level, "%s", describe_packed_kernel())
    return dict(state["decision"])


def describe_packed_kernel() -> str:
    """One line for logs: PackedBitLinear's CPU route, why, and the switches."""
    d = packed_kernel_decision()
    route = (
        f"packed {d['isa']} kernel (2-bit weights, no float copy)" if d["use"] else "pure torch (float weight cache)"
    )
    return (
        f"PackedBitLinear on CPU: {route}; {d['reason']}; {PACKED_KERNEL_ENV}={d['mode']}, "
        f"{PACKED_ISA_ENV}={d['isa_setting']} ({d['source']})"
    )


def use_packed_kernel(device: torch.device) -> bool:
    """Whether a PackedBitLinear call on `device` takes the packed kernel (eager CPU calls only)."""
    if device.type != "cpu":
        return False
    use = _PACKED["use"]
    if use is None:
        if torch.compiler.is_compiling():  # no building or timing inside a trace
            return False
        use = packed_kernel_decision()["use"]
    return bool(use)


def packed_unpack_int8(packed: Tensor, out_features: int, in_features: int) -> Tensor:  # -> (out, in) int8
    """A transient int8 copy of the packed ternary weight (for oneDNN's int8 GEMM on large batches)."""
    return torch.ops.bitmar_packed.unpack_int8(packed, out_features, in_features)


def packed_ternary_linear(
    y: Tensor,  # (N, in) float32 CPU: the normalised activations, before int8 quantization
    packed: Tensor,  # pack_ternary bytes of the (out, in) ternary weight
    out_features: int,
    gamma: Tensor,  # 0-dim float32 weight scale
    bias: Tensor | None,  # (out,) float32
    q_max: int,
) -> Tensor:  # (N, out) float32
    """BitLinear eval's output from packed weights with the decided ISA (call after `use_packed_kernel` is True)."""
    return _PACKED["op"](y.contiguous(), packed, out_features, gamma, bias, q_max, _PACKED["isa_code"],
                         PACKED_GEMM_MIN_ROWS)  # fmt: skip
