"""XLA's cost analysis of a compiled program with its while loops counted once per trip.

XLA's cost analysis (the TPU's `compiled.cost_analysis()` and the generic `HloCostAnalysis`) counts a while loop's
body once, whatever its trip count. Under FSDP the TPU compiler turns all-gathered matmuls and convolutions into such
loops (collective-matmul windows, `windowed_dot_general`: a chunk of the weight per trip while the next one arrives),
so the step's FLOPs and bytes are undercounted by the trips after the first. `loop_weighted_costs` adds them back
from the optimized HLO text: each loop's trip count (from `known_trip_count` when XLA states it, else by running
its induction variable: constant start, constant step, compared with a constant bound), and its body's cost
from XLA's generic `HloCostAnalysis` (the CPU client's: compile-only TPU clients have none) on a module made of
the body and what it calls. A loop whose trip count cannot be read stays counted once (`unknown_trip_counts`).
"""

from __future__ import annotations

import dataclasses
import operator
import re

import jax
from jaxlib import _hlo, _jax  # an HLO module from text and XLA's cost analysis of one: no public API has them

# attributes whose values name computations: fusions' and calls' `calls=`, reductions' `to_apply=`, ...
_CALLED = re.compile(
    r"\b(?:calls|to_apply|body|condition|branch_computations|called_computations|true_computation|"
    r"false_computation|scatter|select|comparator)=(\{[^}]*\}|%[\w.\-]+)"
)
_COMPARE = {
    "LT": operator.lt,
    "LE": operator.le,
    "GT": operator.gt,
    "GE": operator.ge,
    "EQ": operator.eq,
    "NE": operator.ne,
}
_MAX_TRIPS = 1_000_000  # an induction variable that runs longer is not read as a trip count


@dataclasses.dataclass(frozen=True)
class LoopCosts:
    """A program's per-chip FLOPs and bytes accessed with every loop body counted once per trip.

    `while_loops`: loops in the program (nested ones included); `loop_trips`: their trips, each loop's own (a loop
    inside a 4-trip loop that runs 2 trips counts 2); `unknown_trip_counts`: loops counted once, their trip count
    not read from the HLO (then `flops` and `bytes_accessed` are still lower than the program's); `xla_flops`,
    `xla_bytes_accessed`: XLA's own counts, each loop body once."""

    flops: float
    bytes_accessed: float
    xla_flops: float
    xla_bytes_accessed: float
    while_loops: int
    loop_trips: int
    unknown_trip_counts: int


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    opcode: str
    operands: list[str]
    text: str  # the whole line

    def attribute(self, key: str) -> str | None:
        match = re.search(rf"\b{key}=([\w.\-]+)", self.text)
        return match[1] if match else None


def program_costs(compiled: jax.stages.Compiled) -> LoopCosts:
    """XLA's per-device cost analysis of `compiled` (a partitioned program's is one device's share) with its loops
    counted once per trip; zeros where the backend gives no analysis."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    flops, accessed = (float((analysis or {}).get(key) or 0.0) for key in ("flops", "bytes accessed"))
    return loop_weighted_costs(compiled.as_text(), flops, accessed)


def loop_weighted_costs(hlo_text: str, flops: float, bytes_accessed: float) -> LoopCosts:
    """`flops` and `bytes_accessed` (XLA's counts for the program of `hlo_text`, its optimized HLO) plus, for every
    while loop, its body's cost times its trips after the first (times the trips of the loops around it)."""
    preamble, computations, entry = _split(hlo_text)
    loops = _loops(computations, entry)
    extra_flops = extra_bytes = 0.0
    unknown = trips_total = 0
    for loop, trips, outer in loops:
        if trips is None:
            unknown, trips_total = unknown + 1, trips_total + 1
            continue
        trips_total += trips
        if trips == 1:
            continue
        body = _body_costs(preamble, computations, _callee(loop, "body"))
        extra_flops += outer * (trips - 1) * body.get("flops", 0.0)
        extra_bytes += outer * (trips - 1) * body.get("bytes accessed", 0.0)
    return LoopCosts(
        flops + extra_flops, bytes_accessed + extra_bytes, flops, bytes_accessed, len(loops), trips_total, unknown
    )


def _split(hlo_text: str) -> tuple[str, dict[str, list[str]], str]:
    """HLO module text -> (the lines between the module's first line and its first computation, {computation name:
    its lines, in the text's order}, the entry computation's name)."""
    preamble: list[str] = []
    computations: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines()[1:]:
        head = re.match(r"(ENTRY )?%([\w.\-]+) \(", line)
        if head and current is None:
            current = head[2]
            entry = head[2] if head[1] else entry
            computations[current] = []
        if current is None:
            preamble.append(line)
            continue
        computations[current].append(line)
        if line == "}":
            current = None
    if not entry:
        raise ValueError("the HLO text has no ENTRY computation")
    return "\n".join(preamble), computations, entry


def _instructions(lines: list[str]) -> dict[str, _Instruction]:
    found = {}
    for line in lines[1:-1]:
        match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*?\s([a-z][\w\-]*)\(([^)]*)\)", line)
        if match:
            operands = re.findall(r"%([\w.\-]+)", match[3])
            found[match[1]] = _Instruction(match[1], match[2], operands, line)
            if line.lstrip().startswith("ROOT "):
                found["ROOT"] = found[match[1]]
    return found


def _callees(lines: list[str]) -> set[str]:
    names = set()
    for line in lines[1:-1]:
        for value in _CALLED.findall(line):
            names.update(re.findall(r"%([\w.\-]+)", value))
    return names


def _callee(loop: _Instruction, key: str) -> str:
    match = re.search(rf"\b{key}=%([\w.\-]+)", loop.text)
    if not match:
        raise ValueError(f"while loop %{loop.name} names no {key} computation")
    return match[1]


def _loops(computations: dict[str, list[str]], entry: str) -> list[tuple[_Instruction, int | None, int]]:
    """(while instruction, its trip count or None, the product of the trip counts of the loops around it) for every
    loop reached from computation `entry`."""
    found: dict[str, list] = {}  # computation -> its loops, the multiplier relative to it
    parsed: dict[str, dict[str, _Instruction]] = {}

    def instructions_of(name: str) -> dict[str, _Instruction]:
        if name not in parsed:
            parsed[name] = _instructions(computations[name])
        return parsed[name]

    def visit(name: str) -> list:
        if name not in found:
            found[name] = []  # (a call graph has no cycles; this only stops a malformed one)
            instructions = instructions_of(name)
            whiles = [i for i in instructions.values() if i.opcode == "while"]
            bodies = {_callee(loop, "body"): loop for loop in whiles}
            conditions = {_callee(loop, "condition") for loop in whiles}
            loops = []
            for callee in sorted(_callees(computations[name]) - conditions):
                if callee not in computations:
                    continue
                inner = visit(callee)
                loop = bodies.get(callee)
                if loop is None:
                    loops.extend(inner)
                    continue
                condition = instructions_of(_callee(loop, "condition"))
                trips = _trip_count(loop, instructions, condition, instructions_of(callee))
                loops.append((loop, trips, 1))
                loops.extend((i, t, outer * (1 if trips is None else trips)) for i, t, outer in inner)
            found[name] = loops
        return found[name]

    return visit(entry)


def _trip_count(
    loop: _Instruction,
    parent: dict[str, _Instruction],
    condition: dict[str, _Instruction],
    body: dict[str, _Instruction],
) -> int | None:
    """The trips of `loop` (an instruction of `parent`, with those computations' instructions): XLA's
    `known_trip_count`, or the run of an induction variable `i` (tuple element k) that starts at a constant, is
    compared with a constant in the condition's root, and grows by a constant in the body's root. None when the HLO
    does not say it that way."""
    stated = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.text)
    if stated:
        return int(stated[1])
    compare = condition.get("ROOT")
    if compare is None or compare.opcode != "compare" or len(compare.operands) != 2:
        return None
    sides = [_element_or_constant(condition, operand) for operand in compare.operands]
    if sorted(kind for kind, _ in sides) != ["constant", "element"]:
        return None
    index = next(value for kind, value in sides if kind == "element")
    bound = next(value for kind, value in sides if kind == "constant")
    start = _tuple_constant(parent, loop.operands[0] if loop.operands else "", index)
    step = _increment(body, index)
    direction = _COMPARE.get(compare.attribute("direction") or "")
    if start is None or step is None or direction is None:
        return None
    holds = (lambda i: direction(i, bound)) if sides[0][0] == "element" else (lambda i: direction(bound, i))
    value, trips = start, 0
    while holds(value):
        value, trips = value + step, trips + 1
        if trips > _MAX_TRIPS or step == 0:
            return None
    return trips


_PASS_THROUGH = {"copy", "bitcast", "convert"}


def _resolve(instructions: dict[str, _Instruction], name: str) -> _Instruction | None:
    instruction = instructions.get(name)
    while instruction is not None and instruction.opcode in _PASS_THROUGH and instruction.operands:
        instruction = instructions.get(instruction.operands[0])
    return instruction


def _constant(instruction: _Instruction | None) -> int | None:
    if instruction is None or instruction.opcode != "constant":
        return None
    value = re.search(r"constant\((-?\d+)\)", instruction.text)
    return int(value[1]) if value else None


def _element_or_constant(instructions: dict[str, _Instruction], name: str) -> tuple[str, int | None]:
    """("element", k) for a get-tuple-element k of the computation's parameter, ("constant", c), or ("other", None)."""
    instruction = _resolve(instructions, name)
    if instruction is not None and instruction.opcode == "get-tuple-element":
        source = instructions.get(instruction.operands[0]) if instruction.operands else None
        if source is not None and source.opcode == "parameter":
            return "element", int(instruction.attribute("index") or -1)
    constant = _constant(instruction)
    return ("constant", constant) if constant is not None else ("other", None)


def _tuple_constant(instructions: dict[str, _Instruction], name: str, index: int) -> int | None:
    """The constant that element `index` of tuple `name` starts as."""
    tuple_ = instructions.get(name)
    if tuple_ is None or tuple_.opcode != "tuple" or index >= len(tuple_.operands):
        return None
    return _constant(_resolve(instructions, tuple_.operands[index]))


def _increment(body: dict[str, _Instruction], index: int) -> int | None:
    """c when the body's root sets element `index` to element `index` + c (or - c)."""
    root = body.get("ROOT")
    if root is None or root.opcode != "tuple" or index >= len(root.operands):
        return None
    update = _resolve(body, root.operands[index])
    if update is None or update.opcode not in ("add", "subtract") or len(update.operands) != 2:
        return None
    sides = [_element_or_constant(body, operand) for operand in update.operands]
    if ("element", index) not in sides:
        return None
    constants = [value for kind, value in sides if kind == "constant"]
    if len(constants) != 1 or (update.opcode == "subtract" and sides[1][0] != "constant"):
        return None
    return constants[0] if update.opcode == "add" else -constants[0]


def _body_costs(preamble: str, computations: dict[str, list[str]], body: str) -> dict[str, float]:
    """XLA's generic cost analysis of computation `body` and everything it calls, as a module of its own."""
    reached, todo = set(), [body]
    while todo:
        name = todo.pop()
        if name in reached or name not in computations:
            continue
        reached.add(name)
        todo.extend(_callees(computations[name]))
    parts = ["HloModule loop_body", preamble]
    for name, lines in computations.items():
        if name in reached:
            text = "\n".join(lines)
            parts.append("ENTRY " + text.removeprefix("ENTRY ") if name == body else text.removeprefix("ENTRY "))
    module = _hlo.hlo_module_from_text("\n".join(parts))
    costs = _jax.hlo_module_cost_analysis(_analysis_client(), module)
    return {key: float(value) for key, value in costs.items() if key in ("flops", "bytes accessed")}


def _analysis_client() -> object:
    """The CPU client (its cost analysis reads any platform's HLO), or the default one where JAX_PLATFORMS has no
    cpu: compile-only clients (TPU topologies on a CPU host) cannot analyse a module."""
    try:
        return jax.devices("cpu")[0].client
    except RuntimeError:
        return jax.devices()[0].client
