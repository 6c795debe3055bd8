"""What a compiled TPU program's text and cost analysis say: collectives, XLA's cost-model
time (corrected), loops' trip counts and where the time goes.

XLA's cost analysis of a TPU executable (`optimal_seconds`) counts every loop body once and
prices a few ops it has no model for at -1 s. The optimised HLO text carries the TPU
backend's own per-op cycle estimates (`estimated_cycles` in each instruction's backend
config) and the loops' conditions, from which the loops' share is scaled to their trip counts.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                "ragged-all-to-all")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.+?)\s+(" + "|".join(_COLLECTIVES)
                          + r")(-start)?\(", re.MULTILINE)
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def _shape_bytes(shape_text: str) -> list[int]:
    return [_DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
            for dt, dims in _ARRAY.findall(shape_text)]


def collectives(hlo_text: str) -> list[dict[str, Any]]:
    """[{kind, count, bytes}] of the collectives in optimised HLO text, by kind.

    bytes: their results per chip per call (all operands of a combined collective; the output
    buffer of an async all-gather / collective-permute start, whose result also holds the input).
    Collectives inside loops are counted once, as written.
    """
    totals: dict[str, list[int]] = {}
    for shape_text, kind, start in _INSTRUCTION.findall(hlo_text):
        sizes = _shape_bytes(shape_text)
        if start and kind in ("all-gather", "collective-permute") and len(sizes) >= 2:
            sizes = sizes[1:2]
        entry = totals.setdefault(kind, [0, 0])
        entry[0] += 1
        entry[1] += sum(sizes)
    return [{"kind": k, "count": c, "bytes": b} for k, (c, b) in sorted(totals.items())]


def cost_analysis(compiled) -> dict[str, float]:
    """XLA's cost analysis of a compiled program as one dict (flops, optimal_seconds, ...)."""
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


# XLA:TPU's cost model prices an op it has no model for at -1 s in `optimal_seconds`: the
# ConcatBitcast custom call that joins asynchronously sliced copies of an array (a layout
# no-op), ZeroCrop (zeroes an array's padding in place; 3 of them in U-DiT-L's FSDP step
# on v5p-8, whose optimal_seconds was -2.87) and SliceId (a multi-slice program's slice
# index: the demo's step on 2 x v5e-8, 4 ConcatBitcast, 33 ZeroCrop, 1 SliceId, gave
# -38.0 s, and 0.41 ms once they are taken out, half its one-slice time at half the images
# per chip). Each one made whole programs report a negative time.
_UNPRICED = re.compile(r'custom_call_target="(?:ConcatBitcast|ZeroCrop|SliceId)"')


# A Pallas kernel compiled for TPUs (Mosaic). XLA's cost model does not look inside it: it
# takes the flops and bytes the kernel declares (pallas_call's cost_estimate) as given, and
# prices a kernel that declares none at zero (v5e, a 2048^3 bf16 matmul kernel: 87 us
# declared, 0 undeclared, 0 declaring ~0; XLA's own dot 133 us).
_MOSAIC = re.compile(r'custom-call\(.*custom_call_target="tpu_custom_call"')
_DECLARED = re.compile(r'"cost_estimate":\{')


def custom_kernels(hlo_text: str) -> dict[str, int]:
    """The Pallas (Mosaic) kernels in a compiled TPU program: {"count": instructions,
    "undeclared": those without a declared cost estimate, which the cost model prices at
    zero}."""
    kernels = [line for line in hlo_text.splitlines() if _MOSAIC.search(line)]
    return {"count": len(kernels),
            "undeclared": sum(not _DECLARED.search(line) for line in kernels)}


def cost_model_seconds(optimal_seconds: float | None, hlo_text: str) -> float | None:
    """The cost model's time for a compiled program (loop bodies once), with the -1 s of
    each unpriced op (`_UNPRICED`) taken back out; None when there is no positive estimate."""
    if optimal_seconds is None:
        return None
    seconds = float(optimal_seconds) + len(_UNPRICED.findall(hlo_text))
    return seconds if seconds > 0 else None


# Optimised HLO text: computation headers, the TPU backend's per-op cycle estimate, loops.
_HEADER = re.compile(r"^(ENTRY\s+)?%(\S+)\s.*\{\s*$")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_WHILE = re.compile(r"\swhile\(.*\bcondition=%([^\s,]+), body=%([^\s,]+)")
_CALL = re.compile(r"\scall\(.*\bto_apply=%([^\s,]+)")
_LOOP_TEST = re.compile(r"^\s*ROOT\s+%\S+\s*=\s*pred\[\]\S*\s+compare\(([^)]*)\).*direction=LT")
# lax.scan / fori_loop counters are s32; the SPMD partitioner's windowed-einsum loops (FSDP's
# all-gather / reduce-scatter matmuls) count in u32.
_INT_CONSTANT = re.compile(r"^\s*%(\S+)\s*=\s*[su](?:32|64)\[\]\S*\s+constant\((\d+)\)")


@functools.lru_cache(maxsize=2)   # loop_scale and cost_profile read the same program
def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """({computation name: its instruction lines}, the entry computation's name)."""
    computations: dict[str, list[str]] = {}
    entry = current = None
    for line in hlo_text.splitlines():
        if current is None:
            if m := _HEADER.match(line):
                current = m.group(2)
                computations[current] = []
                entry = current if m.group(1) else entry
        elif line.startswith("}"):
            current = None
        else:
            computations[current].append(line)
    return computations, entry


def has_loops(hlo_text: str) -> bool:
    """Whether optimised HLO text has a while loop (whose body XLA's cost analysis counts once)."""
    return _WHILE.search(hlo_text) is not None


def _trip_count(condition: list[str]) -> int | None:
    """N of a loop whose condition is `counter < N` with N an integer constant (lax.scan /
    fori_loop and windowed-einsum counters start at 0); None for any other condition."""
    constants = dict(m.groups() for m in map(_INT_CONSTANT.match, condition) if m)
    for line in condition:
        if m := _LOOP_TEST.match(line):
            bounds = [int(constants[name]) for name in re.findall(r"%([^\s,]+)", m.group(1))
                      if name in constants]
            return bounds[0] if len(bounds) == 1 else None
    return None


_OP_NAME = re.compile(r'op_name="([^"]*)"')
_OP_SCAFFOLD = re.compile(r"^jit\([^)]*\)$|^(while|body|cond|branch_\d+_fun|closed_call|checkpoint|"
                          r"rematted_computation|remat)$|\.<lambda>$|->")


def _op_group(line: str) -> str:
    """The model part an HLO instruction came from: "forward"/"backward" and the module path
    ("backward encoder_level_1/blocks_*/attn1/to_qkv"), without the jit name, loop/remat
    scaffolding, einsum specs, block indices and the primitive; ops outside the model keep
    their primitive
    ("outside the model: add", the optimizer update and the loss)."""
    m = _OP_NAME.search(line)
    if not m:
        return "(no source op)"
    # Repeated blocks (blocks_0, blocks_1, ...) count as one part.
    parts = [re.sub(r"^blocks_\d+$", "blocks_*", p) for p in m.group(1).split("/")
             if not _OP_SCAFFOLD.search(p)]
    if parts and parts[0].startswith(("jvp(", "transpose(jvp(")):
        direction = "backward" if parts[0].startswith("transpose(") else "forward"
        # remat's recomputed forward inside the backward: transpose(jvp(M))/jvp(M)/...
        parts = parts[:1] + [p for p in parts[1:] if not p.startswith("jvp(")]
        return " ".join([direction, "/".join(parts[1:-1]) or parts[-1]]) if len(parts) > 1 \
            else direction
    return "outside the model: " + ("/".join(parts) or m.group(1))


def _cycles_by_op(hlo_text: str, trips: bool, group=_op_group) -> dict[str, int] | None:
    """The TPU backend's per-op cycle estimates summed by `group(line)` (default: the source
    op, `_op_group`), from the entry computation down through loops (each body times its trip
    count when `trips`, else once) and calls; fused computations are priced at their fusion.
    None when a needed trip count cannot be read or the program has no entry."""
    computations, entry = _computations(hlo_text)
    memo: dict[str, dict[str, int] | None] = {}

    def walk(name: str) -> dict[str, int] | None:
        if name not in memo:
            totals: dict[str, int] = {}

            def add(part: dict[str, int] | None, times: int) -> bool:
                if part is None:
                    return False
                for op, cycles in part.items():
                    totals[op] = totals.get(op, 0) + times * cycles
                return True

            ok = True
            for line in computations.get(name, ()):
                if m := _CYCLES.search(line):
                    op = group(line)
                    totals[op] = totals.get(op, 0) + int(m.group(1))
                if w := _WHILE.search(line):
                    n = _trip_count(computations.get(w.group(1), [])) if trips else 1
                    ok = n is not None and add(walk(w.group(2)), n) and add(walk(w.group(1)), n + 1)
                elif c := _CALL.search(line):
                    ok = add(walk(c.group(1)), 1)
                if not ok:
                    break
            memo[name] = totals if ok else None
        return memo[name]

    return None if entry is None else walk(entry)


def loop_scale(hlo_text: str) -> float | None:
    """How much longer the program runs than XLA's cost analysis counts, which takes every
    loop body once: (the TPU backend's per-op cycle estimates, summed with each loop body
    times its trip count) / (the same with each body once). 1.0 without loops; None when a
    loop's trip count cannot be read or the text has no cycle estimates (not a TPU program).
    """
    once, scaled = _cycles_by_op(hlo_text, False), _cycles_by_op(hlo_text, True)
    if not once or scaled is None or not sum(once.values()):
        return None
    return sum(scaled.values()) / sum(once.values())


def cost_profile(hlo_text: str, top: int = 12) -> list[dict[str, Any]]:
    """Where the cost model's time goes: the `top` model parts (`_op_group`) by their share of
    the TPU backend's cycle estimates over the whole call (loops times their trip counts)."""
    cycles = _cycles_by_op(hlo_text, True) or {}
    total = sum(cycles.values())
    ranked = sorted(cycles.items(), key=lambda item: -item[1])[:top]
    return [{"op": op, "share": c / total} for op, c in ranked] if total else []


# What kind of work an instruction is, by its opcode or, for a fusion, by what it fuses.
_OPCODE = re.compile(r"=\s.*?\s([a-z][a-z0-9\-]*)\(")
_FUSED = re.compile(r"\bcalls=%([^\s,]+)")
MATMUL = "matmuls and convolutions"
KINDS = (MATMUL, "copies and transposes", "dynamic slices (scan residuals, stacked params)",
         "collectives", "elementwise, reductions and the rest")


def _opcode(line: str) -> str:
    m = _OPCODE.search(line)
    return m.group(1) if m else ""


def _kind_of_ops(opcodes: set[str], root: str) -> str:
    if opcodes & {"dot", "convolution"}:
        return KINDS[0]
    if opcodes & {"dynamic-slice", "dynamic-update-slice"}:
        return KINDS[2]
    if root in ("copy", "transpose", "copy-start", "copy-done"):
        return KINDS[1]
    if any(op.startswith(_COLLECTIVES) for op in opcodes):
        return KINDS[3]
    return KINDS[4]


def cost_by_kind(hlo_text: str) -> list[dict[str, Any]]:
    """Where the cost model's time goes by kind of work (`KINDS`), loops times their trip
    counts: [{kind, share}], largest first; [] without cycle estimates. A fusion counts as a
    matmul when it fuses a dot or convolution (the MXU's work, with what XLA fused into it),
    as a dynamic slice when it fuses a dynamic-(update-)slice (a scan reading or writing its
    stacked residuals or params), as a copy when its root is a copy or transpose."""
    computations, _ = _computations(hlo_text)

    @functools.cache
    def fused_opcodes(name: str) -> frozenset[str]:   # through nested fusions
        ops = set()
        for x in computations.get(name, ()):
            ops.add(_opcode(x))
            if m := _FUSED.search(x):
                ops |= fused_opcodes(m.group(1))
        return frozenset(ops)

    def kind(line: str) -> str:
        op = _opcode(line)
        if op == "fusion" and (m := _FUSED.search(line)):
            body = computations.get(m.group(1), [])
            root = next((_opcode(x) for x in body if x.lstrip().startswith("ROOT")), "")
            return _kind_of_ops(set(fused_opcodes(m.group(1))), root)
        return _kind_of_ops({op}, op)

    cycles = _cycles_by_op(hlo_text, True, kind) or {}
    total = sum(cycles.values())
    return [{"kind": k, "share": c / total}
            for k, c in sorted(cycles.items(), key=lambda item: -item[1]) if c] if total else []
