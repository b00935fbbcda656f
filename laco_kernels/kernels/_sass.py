"""Read the SASS of a compiled Triton kernel: the steady-state loop and what it issues per iteration.

Used by ``bench/sass_audit.py`` (and its test) to count, without a GPU, the instructions a
kernel's main loop issues per warp and iteration. Pipeline (Triton 3.9):

1. :func:`laco_kernels.kernels._compile.compile_kernel` compiles a :class:`CompileSpec` for
   sm_80 / sm_90 down to a cubin;
2. :func:`disassemble` runs the ``cuobjdump -sass`` that ships in ``triton/backends/nvidia/bin``;
3. :func:`parse` turns each ``/*addr*/  [@pred] OPCODE operands ;`` line into an :class:`Instr`;
4. :func:`steady_loop` finds the steady-state loop: a branch whose target address is at or
   before its own address closes a loop, and the span with the most tensor-core instructions
   (then the largest) is the K loop (software pipelining puts the prologue before it and the
   epilogue after it);
5. :func:`loop_stats` counts the loop's instructions (= instructions per warp per iteration),
   the shared-memory stores / loads that are *not* the load pipeline (``STS`` / ``LDS``: layout
   conversions through shared memory; ``LDGSTS`` async copies and ``LDSM`` matrix loads are the
   normal pipeline and counted apart), and a histogram by instruction class.

``@!PT`` / ``@!UPT`` instructions (predicated on "never") are scheduling placeholders the
compiler inserts (e.g. ``@!PT LDS RZ, [RZ]``): they take an issue slot, so they count in the loop
length, but not as shared-memory traffic (``guards`` counts them).

Derived figures: thread-instructions per weight byte = loop instructions x 32 x warps / weight
bytes one iteration loads (:func:`thread_instr_per_byte`; H100 budget at full issue about 8.8,
a bandwidth-bound loop about 3 or less) and thread-instructions per multiply-add of the tile
(:func:`thread_instr_per_mac`; comparable across tile shapes, the training kernels' yardstick).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from ._compile import CompileSpec, compile_kernel, compile_spec, run_cuobjdump

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PRED = re.compile(r"^@(!?U?P[T0-9])\s+")

# opcode (text before the first ".") -> class; anything else starting with "U" is "uniform"
# (the per-warp scalar datapath), the rest "other"
_CLASSES: Dict[str, Tuple[str, ...]] = {
    "tensor_core": ("HMMA", "IMMA", "DMMA", "BMMA", "HGMMA", "IGMMA", "BGMMA", "QGMMA", "OMMA"),
    "fp32": ("FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "MUFU", "FSWZADD", "FMNMX3",
             "FADD2", "FFMA2", "FMUL2"),
    "fp16x2": ("HFMA2", "HADD2", "HMUL2", "HMNMX2", "HSETP2", "HSET2"),
    "convert": ("F2F", "F2FP", "F2I", "I2F", "I2FP", "F2IP", "FRND"),
    "integer": ("IMAD", "IADD3", "IADD", "VIADD", "VIADDMNMX", "VIMNMX", "IMNMX", "LOP3", "LOP", "SHF", "SHL",
                "SHR", "LEA", "ISETP", "SEL", "POPC", "FLO", "BMSK", "BREV", "SGXT", "IABS", "IMUL", "IDP", "PLOP3",
                "P2R", "R2P", "ICMP", "IDP4A", "VABSDIFF", "VABSDIFF4"),
    "move": ("MOV", "PRMT", "SHFL", "S2R", "CS2R", "LDC", "R2UR", "S2UR", "MOVM"),
    "global_load": ("LDG",),
    "global_store": ("STG", "RED", "REDG", "ATOM", "ATOMG"),
    "async_copy": ("LDGSTS", "LDGDEPBAR", "DEPBAR", "UTMALDG", "UTMASTG", "UBLKCP", "UTMAPF", "SYNCS", "ARRIVES"),
    "shared_pipeline": ("LDSM", "STSM"),
    "sts": ("STS",),
    "lds": ("LDS",),
    "sync": ("BAR", "WARPGROUP", "WARPSYNC", "MEMBAR", "FENCE", "ERRBAR", "CCTL"),
    "control": ("BRA", "BRX", "JMP", "BSSY", "BSYNC", "EXIT", "NOP", "YIELD", "CALL", "RET", "BPT", "BREAK",
                "ELECT", "ENDCOLLECTIVE", "ACQBULK"),
    "local": ("LDL", "STL"),
}
_CLASS_OF = {op: cls for cls, ops in _CLASSES.items() for op in ops}


@dataclass(frozen=True)
class Instr:
    addr: int
    pred: str  # "" when unpredicated, else e.g. "!P3", "PT", "!UPT"
    opcode: str  # full opcode with modifiers, e.g. "LDGSTS.E.BYPASS.128"
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def never(self) -> bool:
        """Predicated on "never" (``@!PT`` / ``@!UPT``): a placeholder that does nothing."""
        return self.pred in ("!PT", "!UPT")

    @property
    def cls(self) -> str:
        return instr_class(self.base)


def instr_class(base: str) -> str:
    if base in _CLASS_OF:
        return _CLASS_OF[base]
    return "uniform" if base.startswith("U") else "other"


def disassemble(cubin: bytes) -> str:
    """SASS text of a cubin (``cuobjdump -sass``)."""
    return run_cuobjdump(cubin, "-sass")


def parse(sass: str) -> List[Instr]:
    """Instructions of the (single) function in ``sass``, in address order."""
    if sass.count("Function :") > 1:
        raise ValueError("SASS holds more than one function; pass one kernel's cubin")
    out = []
    for m in _LINE.finditer(sass):
        text = m.group(2)
        pm = _PRED.match(text)
        pred = pm.group(1) if pm else ""
        if pm:
            text = text[pm.end():]
        op, _, rest = text.partition(" ")
        out.append(Instr(int(m.group(1), 16), pred, op, rest.strip()))
    if not out:
        raise ValueError("no SASS instruction lines found (cuobjdump output format changed?)")
    return out


def _branch_target(ins: Instr) -> int | None:
    if ins.base not in ("BRA", "JMP"):
        return None
    hexes = re.findall(r"0x([0-9a-f]+)", ins.operands)
    return int(hexes[-1], 16) if hexes else None


def loops(instrs: Sequence[Instr]) -> List[Tuple[int, int]]:
    """(first, last) instruction indices of every backward-branch span (self-branches excluded:
    the ``BRA`` to itself after ``EXIT`` is the end-of-code trap, not a loop)."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    spans = []
    for i, ins in enumerate(instrs):
        t = _branch_target(ins)
        if t is not None and t < ins.addr and t in index:
            spans.append((index[t], i))
    return spans


def steady_loop(instrs: Sequence[Instr]) -> Tuple[int, int] | None:
    """The steady-state loop (first, last index, inclusive), or None (no loop): among the
    backward-branch spans, the one with the most tensor-core instructions, then the largest.

    Size alone is not enough: a kernel with a second, shorter-running loop (the db row sum of the
    dW / dV kernels, once per program of the first K tile) can have that loop longer in
    instructions than its GEMM loop once the GEMM loop loses its bound tests (``EVEN``)."""
    spans = loops(instrs)
    if not spans:
        return None

    def tensor_core(span):
        return sum(1 for i in instrs[span[0]:span[1] + 1] if not i.never and i.cls == "tensor_core")

    return max(spans, key=lambda s: (tensor_core(s), s[1] - s[0]))


def loop_stats(sass: str | Sequence[Instr], num_warps: int) -> dict:
    """Statistics of the steady-state loop of one kernel's SASS.

    Returns ``{loop_instructions (per warp and iteration; 0 without a loop), sts, lds (outside
    the load pipeline, placeholders excluded), ldsm, ldgsts, guards (@!PT placeholders),
    classes {class: count} (placeholders as "guard"), opcodes {base opcode: count} (placeholders
    excluded), total_instructions, loops (number of
    backward branches), num_warps}``.
    """
    instrs = parse(sass) if isinstance(sass, str) else list(sass)
    span = steady_loop(instrs)
    body = instrs[span[0]:span[1] + 1] if span else []
    live = [i for i in body if not i.never]
    bases = Counter(i.base for i in live)
    return dict(loop_instructions=len(body), sts=bases["STS"], lds=bases["LDS"], ldsm=bases["LDSM"],
                ldgsts=bases["LDGSTS"], guards=len(body) - len(live),
                classes=dict(sorted(Counter("guard" if i.never else i.cls for i in body).items())),
                opcodes=dict(sorted(bases.items())),
                total_instructions=len(instrs), loops=len(loops(instrs)), num_warps=num_warps,
                loop_span=[instrs[span[0]].addr, instrs[span[1]].addr] if span else None)


def thread_instr_per_byte(loop_instructions: int, num_warps: int, weight_bytes: float) -> float | None:
    """Thread-instructions one loop iteration issues per weight byte it loads
    (``loop_instructions x 32 x num_warps / weight_bytes``); None when no weight is loaded."""
    if not weight_bytes:
        return None
    return loop_instructions * 32 * num_warps / weight_bytes


def thread_instr_per_mac(loop_instructions: int, num_warps: int, spec: CompileSpec) -> float | None:
    """Thread-instructions per multiply-add of one iteration's ``BLOCK_M x BLOCK_N x BLOCK_K``
    tile product (None when the spec has no such three block sizes). Independent of which of
    the three dimensions the loop reduces over."""
    c = spec.constexprs
    if not all(isinstance(c.get(b), int) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K")):
        return None
    return loop_instructions * 32 * num_warps / (c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"])


def spec_stats(spec: CompileSpec, arch: int, densities: Sequence[float] = (0.5, 0.3)) -> dict:
    """Compile ``spec`` for ``sm_<arch>`` and return its compile record (registers, spills, ...)
    merged with :func:`loop_stats`, ``family``, ``regime``, ``loop_weight_bytes`` and
    ``thread_instr_per_byte`` (both ``{density: value}`` for each density, or None when the spec
    declares no ``loop_weight_bytes``) and ``thread_instr_per_mac``."""
    compiled = compile_kernel(spec, arch)
    rec = compile_spec(spec, arch, compiled=compiled)
    st = loop_stats(disassemble(compiled[0].asm["cubin"]), spec.num_warps)
    rec.update(st, family=spec.family, regime=spec.regime,
               thread_instr_per_mac=thread_instr_per_mac(st["loop_instructions"], spec.num_warps, spec))
    if spec.loop_weight_bytes is not None:
        wb = {str(d): float(spec.loop_weight_bytes(d)) for d in densities}
        rec["loop_weight_bytes"] = wb
        rec["thread_instr_per_byte"] = {d: thread_instr_per_byte(st["loop_instructions"], spec.num_warps, b)
                                        for d, b in wb.items()}
    else:
        rec["loop_weight_bytes"] = rec["thread_instr_per_byte"] = None
    return rec
