"""Compile a Triton kernel for a GPU architecture on a machine without a GPU, and read its resources.

A kernel file lists every configuration it can launch as :class:`CompileSpec` records in a
module-level ``COMPILE_SPECS``; ``bench/compile_report.py`` compiles each for sm_80 and sm_90
with :func:`compile_spec` and checks registers, spills, shared memory and tensor-core use.

How (Triton 3.9): ``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda",
arch, 32))`` runs the whole pipeline down to a cubin without a driver. Resources come from the
cubin through the ``cuobjdump --dump-resource-usage`` that ships with Triton; spills come from
the ``ptxas -v`` log Triton writes while compiling (``bytes spill stores``), which is exact,
whereas cuobjdump only shows the stack frame.

Interpreter: with ``TRITON_INTERPRET=1`` every ``@triton.jit`` object is an
``InterpretedFunction`` (holding the plain Python function in ``.fn``), which the compiler
cannot lower. :func:`compile_spec` then wraps the kernel and, for the duration of the compile,
every ``InterpretedFunction`` it reaches through module globals (its helpers, and the ``@jit``
code of ``triton.language`` such as ``tl.cdiv``) in real ``JITFunction``s, restoring them after.
Not thread-safe: do not run interpreted kernels in another thread while compiling.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ARCHS = (80, 90)


@dataclass
class CompileSpec:
    """One launchable configuration of one kernel.

    signature: argument name -> Triton type (``"*fp16"``, ``"i32"``, ``"constexpr"``...);
    constexprs: value of every ``"constexpr"`` argument; is_gemm: the kernel does a ``tl.dot``;
    expect_tensor_core: the dot must lower to mma / wgmma (False only where a config
    deliberately asks for FMA, e.g. fp32 ``input_precision="ieee"``); representative: compiled by
    the quick test subset too (the full report compiles every spec); family / regime /
    loop_weight_bytes: what the SASS audit (``_sass.py``, ``bench/sass_audit.py``) groups by and
    divides by (see the field comments). To mirror what a launch
    compiles, give integer arguments equal to 1 (unit strides) as ``"constexpr"`` with value 1
    (Triton specializes them so at launch) and list 16-divisible arguments in ``divisible``.
    """

    kernel: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int
    config: str
    is_gemm: bool = True
    expect_tensor_core: bool | None = None
    note: str = ""
    representative: bool = True  # part of the subset tests compile (all specs go in the full report)
    divisible: tuple = ()  # arguments known to be multiples of 16 (pointers: 16-byte aligned), as at launch
    # SASS audit metadata (bench/sass_audit.py); optional, None = not audited
    family: str | None = None   # "dense" | "sparse24" | "bitmap" | "masked" | ... (audit grouping)
    regime: str | None = None   # "decode" | "prefill" | "train-fwd" | "train-dx" | "train-dw" | ...
    loop_weight_bytes: Callable[[float], float] | None = None  # weight bytes (values + metadata) one program loads per steady-state loop iteration, as a function of density (fraction of kept weights; ignored by dense and 2:4)
    archs: tuple = ARCHS  # the architectures this config is launched on (a table row may be sm_90-only)

    def __post_init__(self):
        if self.expect_tensor_core is None:
            self.expect_tensor_core = self.is_gemm
        missing = [k for k, v in self.signature.items() if v == "constexpr" and k not in self.constexprs]
        if missing:
            raise ValueError(f"{self.config}: constexpr arguments without a value: {missing}")

    @property
    def name(self) -> str:
        return _raw_fn(self.kernel).__name__


def _raw_fn(kernel):
    """The plain Python function behind a JITFunction or an InterpretedFunction."""
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def _is_interpreted(obj) -> bool:
    return type(obj).__name__ == "InterpretedFunction" and hasattr(obj, "fn")


_JIT_CACHE: Dict[int, JITFunction] = {}


def _to_jit(interp) -> JITFunction:
    """One JITFunction per underlying Python function (so `tl.cdiv is standard.cdiv` still holds)."""
    key = id(interp.fn)
    if key not in _JIT_CACHE:
        _JIT_CACHE[key] = JITFunction(interp.fn, **getattr(interp, "kwargs", {}))
    return _JIT_CACHE[key]


@contextlib.contextmanager
def _jit_globals(fn) -> Iterator[None]:
    """Temporarily replace InterpretedFunctions reachable from ``fn``'s globals by JITFunctions."""
    replaced = []  # (globals dict, name, old value)
    seen = set()

    def visit(f):
        g = f.__globals__
        if id(f) in seen:
            return
        seen.add(id(f))
        for name, val in list(g.items()):
            if _is_interpreted(val):
                replaced.append((g, name, val))
                g[name] = _to_jit(val)
                visit(val.fn)
            elif isinstance(val, JITFunction):
                visit(val.fn)

    try:
        # the Triton standard library (tl.cdiv, tl.sum, ...) is @jit code too
        for mod_name, mod in list(sys.modules.items()):
            if mod is None or not mod_name.startswith("triton.language"):
                continue
            g = vars(mod)
            for name, val in list(g.items()):
                if _is_interpreted(val):
                    replaced.append((g, name, val))
                    g[name] = _to_jit(val)
        visit(fn)
        yield
    finally:
        for g, name, val in reversed(replaced):
            g[name] = val


def _cuobjdump() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path} (Triton {triton.__version__} layout changed?)")
    return path


def run_cuobjdump(cubin: bytes, *args: str) -> str:
    """stdout of ``cuobjdump <args> <cubin written to a temporary file>``."""
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.cubin")
        with open(p, "wb") as f:
            f.write(cubin)
        return subprocess.run([_cuobjdump(), *args, p], check=True, capture_output=True, text=True).stdout


def _resource_usage(cubin: bytes) -> Dict[str, int]:
    out = run_cuobjdump(cubin, "--dump-resource-usage")
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"could not parse cuobjdump --dump-resource-usage output:\n{out}")
    reg, stack, shared, local = (int(v) for v in m.groups())
    return dict(registers=reg, stack=stack, shared=shared, local=local)


def _spill_bytes(ptxas_log: str) -> int:
    stores = [int(v) for v in re.findall(r"(\d+) bytes spill stores", ptxas_log)]
    loads = [int(v) for v in re.findall(r"(\d+) bytes spill loads", ptxas_log)]
    if not stores:
        raise RuntimeError(f"no 'bytes spill stores' line in the ptxas log:\n{ptxas_log}")
    return sum(stores) + sum(loads)


def tensor_core_kind(ptx: str) -> str:
    """``"wgmma"``, ``"mma"``, ``"mma.sp"`` (sparse, ``sparse24_mma.py``) or ``"none"``: the tensor-core
    instruction family present in the PTX."""
    if re.search(r"\bwgmma\.", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sp(::ordered_metadata)?\.sync\b", ptx):
        return "mma.sp"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma"
    return "none"


def compile_kernel(spec: CompileSpec, arch: int):
    """Compile ``spec`` for ``sm_<arch>``; return ``(CompiledKernel, ptxas log)``.

    The kernel carries ``asm["ttgir" | "ptx" | "cubin"]`` and ``metadata``; the log holds the
    ``ptxas -v`` lines (spills). Works with or without ``TRITON_INTERPRET=1``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _raw_fn(spec.kernel)
    jf = spec.kernel if isinstance(spec.kernel, JITFunction) else JITFunction(fn)
    names = list(spec.signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.divisible}
    src = ASTSource(fn=jf, signature=dict(spec.signature), constexprs=dict(spec.constexprs), attrs=attrs)
    knobs = triton.knobs
    old = (knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log)
    log = io.StringIO()
    try:
        knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
        knobs.nvidia.dump_ptxas_log = True
        with _jit_globals(fn), contextlib.redirect_stdout(log):
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = old
    return k, log.getvalue()


def compile_spec(spec: CompileSpec, arch: int, compiled=None) -> dict:
    """Compile ``spec`` for ``sm_<arch>``; return ``{kernel, config, arch, registers, spill_bytes,
    shared_bytes, tensor_core, ...}``. ``compiled``: an earlier :func:`compile_kernel` result
    (reused instead of compiling again). Works with or without ``TRITON_INTERPRET=1``."""
    k, log = compiled if compiled is not None else compile_kernel(spec, arch)
    res = _resource_usage(k.asm["cubin"])
    return dict(kernel=spec.name, config=spec.config, arch=f"sm_{arch}", registers=res["registers"],
                spill_bytes=_spill_bytes(log), shared_bytes=max(res["shared"], k.metadata.shared),
                stack_bytes=res["stack"], local_bytes=res["local"], tensor_core=tensor_core_kind(k.asm["ptx"]),
                num_warps=spec.num_warps, num_stages=spec.num_stages, is_gemm=spec.is_gemm,
                expect_tensor_core=spec.expect_tensor_core)


def collect_specs(modules) -> List[CompileSpec]:
    """Concatenate ``COMPILE_SPECS`` of the given modules (those that define it)."""
    out: List[CompileSpec] = []
    for mod in modules:
        out.extend(getattr(mod, "COMPILE_SPECS", []))
    return out
