"""What XLA says about one program: per-device memory, flops, compile time, largest buffers.

    stats, compiled = compile_stats(jax.jit(f).lower(*abstract_args), platform="tpu")
    stats["fits"], stats["peak_bytes"], stats["largest_buffers"][0]

The program is compiled with an XLA dump into a temporary directory (deleted afterwards):
its buffer assignment names every buffer with its size, shape, HLO instruction, JAX op
name and source line, and it is written even when the compile runs out of memory, so the
largest buffers are listed exactly when they matter most. A compile-time out-of-memory
(`RESOURCE_EXHAUSTED`) is `fits: False` with the compiler's message in `compiler_error`.

Peak per device: `memory_analysis().peak_memory_in_bytes` on TPU (the compiler's own peak of
the scheduled program; arguments + outputs − aliased + temporaries overstates it there,
e.g. temporaries above the peak on v5e); on CPU that field leaves temporaries out, so
arguments + outputs − aliased + temporaries is used instead.
"""
from __future__ import annotations

import glob
import os
import re
import resource
import tempfile
import time

import jax

MEMORY_FIELDS = ("argument", "output", "alias", "temp", "generated_code")

_VALUE = re.compile(r"^\s*value: <(\d+) (\S+) @\d+> \(size=(\d+),offset=\d+\): (\S+)")
_ALLOCATION = re.compile(r"^allocation \d+: size \d+, (.*)$")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_TABLE_ROW = re.compile(r"^(\d+) (.*)$")
_FIELD = re.compile(r"(\w+)=(\d+)")


def _kind(allocation: str) -> str:
    """Buffer kind from an allocation header ('parameter 3, shape ...', 'preallocated-temp')."""
    if allocation.startswith("parameter"):
        return "argument"
    if allocation.startswith("output"):
        return "output"
    if allocation.startswith("constant"):
        return "constant"
    return "temp"


def _values(path: str) -> dict[str, dict]:
    """Buffer assignment: value name -> {bytes, shape, kind, instruction} (its largest)."""
    out: dict[str, dict] = {}
    kind = "temp"
    with open(path) as f:
        for line in f:
            if line.startswith("allocation"):
                m = _ALLOCATION.match(line)
                kind = _kind(m.group(1)) if m else "temp"
                continue
            m = _VALUE.match(line)
            if m:
                name, size, shape = m.group(2), int(m.group(3)), m.group(4).split("{")[0]
                if size > out.get(name, {}).get("bytes", -1):
                    # a tuple element is named `fusion.3{1}`: the instruction is `fusion.3`
                    out[name] = {"bytes": size, "shape": shape, "kind": kind,
                                 "instruction": name.split("{")[0]}
    return out


def _metadata(path: str, names: set[str]) -> dict[str, tuple[str, int | None]]:
    """instruction name -> (JAX op name, stack frame id) from the buffer-assignment values file."""
    out: dict[str, tuple[str, int | None]] = {}
    with open(path) as f:
        for line in f:
            if not line.startswith(" from instruction: %"):
                continue
            name = line[len(" from instruction: %"):].split(" ", 1)[0]
            if name in names and name not in out:
                op = _OP_NAME.search(line)
                frame = _FRAME_ID.search(line)
                op_name = op.group(1).replace('\\"', '"').replace("\\'", "'") if op else ""
                out[name] = (op_name, int(frame.group(1)) if frame else None)
    return out


def _short(path: str) -> str:
    """A source path as `perpo_jax/...` when it is the project's, else its file name."""
    at = path.rfind("perpo_jax/")
    return path[at:] if at >= 0 else os.path.basename(path)


def _source_lines(path: str) -> dict[int, str]:
    """stack frame id -> 'file.py:line (function) < caller file:line (function)' from the
    HLO module's header tables (a frame's printed parent_frame_id is its parent's id + 1)."""
    tables: dict[str, dict[int, str]] = {}
    table = None
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith(("%", "ENTRY")):
                break
            if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
                table = tables.setdefault(line, {})
                continue
            m = _TABLE_ROW.match(line)
            if table is not None and m:
                table[int(m.group(1))] = m.group(2).strip('"')
    files, functions = tables.get("FileNames", {}), tables.get("FunctionNames", {})
    where = {}
    for i, row in tables.get("FileLocations", {}).items():
        f = {k: int(v) for k, v in _FIELD.findall(row)}
        where[i] = (f"{_short(files.get(f.get('file_name_id'), '?'))}:{f.get('line')} "
                    f"({functions.get(f.get('function_name_id'), '?')})")
    frames = {i: {k: int(v) for k, v in _FIELD.findall(row)}
              for i, row in tables.get("StackFrames", {}).items()}

    def chain(i: int) -> str:
        here = where.get(frames[i].get("file_location_id"), "")
        parent = frames[i].get("parent_frame_id", 0) - 1
        if parent > 0 and parent in frames and parent != i:
            return f"{here} < {where.get(frames[parent].get('file_location_id'), '')}"
        return here

    return {i: chain(i) for i in frames}


def largest_buffers(dump_dir: str, top: int) -> list[dict]:
    """The `top` largest buffers of the dumped program, one entry per (shape, op, source) with
    how many such buffers there are: {bytes, shape, kind, count, op_name, source}."""
    pattern = os.path.join(dump_dir, "*after_optimizations-buffer-assignment.txt")
    assignment = sorted(glob.glob(pattern))
    if not assignment:
        return []
    path = assignment[-1]
    values = _values(path)
    groups: dict[tuple, dict] = {}
    base = path[: -len("-buffer-assignment.txt")]
    names = {v["instruction"] for v in values.values()}
    meta = _metadata(base + "-buffer-assignment-values.txt", names) if os.path.exists(
        base + "-buffer-assignment-values.txt") else {}
    frames = _source_lines(base + ".txt") if os.path.exists(base + ".txt") else {}
    for v in values.values():
        op_name, frame = meta.get(v["instruction"], ("", None))
        source = frames.get(frame, "")
        key = (v["bytes"], v["shape"], v["kind"], source or op_name)
        if key not in groups:
            groups[key] = dict(v, count=0, op_name=op_name, source=source)
        groups[key]["count"] += 1
    ranked = sorted(groups.values(), key=lambda g: (g["bytes"], g["count"]), reverse=True)
    return ranked[:top]


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def _rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def compile_stats(lowered, *, platform: str, top: int = 8):
    """Compiles `lowered` (a `jax.stages.Lowered` for devices of `platform`, "tpu" or "cpu");
    returns (stats dict, Compiled or None).

    stats: fits, compiler_error, compile_seconds, peak_bytes and the `MEMORY_FIELDS` as
    `<field>_bytes` (per device), xla_flops (per device, XLA's count: a loop body once),
    host_peak_rss_bytes (this process's high-water mark after the compile), largest_buffers
    (see `largest_buffers`). Any other compile failure is raised.
    """
    with tempfile.TemporaryDirectory(prefix="perpo_jax_xla_") as dump:
        t0 = time.perf_counter()
        compiled, error = None, None
        try:
            compiled = lowered.compile(compiler_options={"xla_dump_to": dump})
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            error = str(e).strip()
        stats = {"fits": compiled is not None, "compiler_error": error,
                 "compile_seconds": round(time.perf_counter() - t0, 2)}
        stats["largest_buffers"] = largest_buffers(dump, top)
    stats["host_peak_rss_bytes"] = _rss_bytes()
    if compiled is None:
        return stats, None
    memory = compiled.memory_analysis()
    for field in MEMORY_FIELDS:
        stats[f"{field}_bytes"] = int(getattr(memory, f"{field}_size_in_bytes"))
    summed = (stats["argument_bytes"] + stats["output_bytes"] - stats["alias_bytes"]
              + stats["temp_bytes"])
    peak = getattr(memory, "peak_memory_in_bytes", None)
    stats["peak_bytes"] = int(peak) if platform == "tpu" and peak else summed
    stats["xla_flops"] = _flops(compiled)  # a scanned loop body counted once: see memory_plan.model_flops
    return stats, compiled
