"""TPU slices by name (v5e-8, v4-8, v5p-16, ...) and their compile-only devices on any host.

    spec = tpu_slice("v4-8")           # TpuSlice(topology="v4:2x2x1", chips=4, hbm_gib=30.75, ...)
    devices = slice_devices(spec)      # 4 TPU devices; jax.devices() stays whatever it was

With the `libtpu` wheel installed, `jax.experimental.topologies.get_topology_desc` gives TPU
devices that `jit(...).lower(...).compile()` accepts on a machine without a TPU: XLA's TPU
compiler runs on the host and says how much HBM each chip needs (or that it does not fit).
The names and topology specs follow google/maxtext's `accelerator_to_spec_map.py`; v4 and
v5p names count TensorCores (two per chip, one "megacore" device), v5e and v6e count chips.
`hbm_gib` is the HBM per chip that the TPU compiler itself makes available to a program (read
from its out-of-memory messages with libtpu 0.0.42.1: 15.75 / 30.75 / 95.74 / 31.25 GiB).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os

import jax
from jax.experimental import topologies

LIBTPU_PIN = "libtpu==0.0.42.1"  # what jax 0.10.2's [tpu] extra resolves to (libtpu==0.0.42.*)


class TopologyError(ValueError):
    """A TPU slice that cannot be made here: unknown name, or libtpu missing."""


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    name: str  # "v5e-8"
    topology: str  # libtpu's topology name, "v5e:2x4"
    chip_config: str  # "default" (one core per chip) or "megacore" (v4, v5p: two cores, one device)
    host_bounds: tuple[int, int, int]  # chips per host in each dimension (maxtext's)
    wrap: tuple[bool, bool, bool]  # torus wrap-around per dimension
    hbm_gib: float  # HBM per chip available to a program, as the TPU compiler counts it
    device_kind: str  # what the devices report, "TPU v5 lite"

    @property
    def chips(self) -> int:
        """Devices of the slice (one per chip)."""
        return math.prod(int(d) for d in self.topology.split(":")[1].split("x"))

    @property
    def accelerator_type(self) -> str:
        """The Cloud TPU accelerator type of the slice (`gcloud ... --accelerator-type`)."""
        family, count = self.name.split("-")
        return f"v5litepod-{count}" if family == "v5e" else self.name


# family -> (chip config, usable HBM GiB per chip, device kind, name count per chip)
_FAMILIES = {
    "v5e": ("default", 15.75, "TPU v5 lite", 1),
    "v6e": ("default", 31.25, "TPU v6 lite", 1),
    "v4": ("megacore", 30.75, "TPU v4", 2),
    "v5p": ("megacore", 95.74, "TPU v5", 2),
}
_F3, _TT3 = (False, False, False), (True, True, True)
# chip grid -> wrap, per family (maxtext's table; larger v4 / v5p grids wrap in all dimensions)
_GRIDS = {
    "v5e": {"1x1": _F3, "2x2": _F3, "2x4": _F3, "4x4": _F3, "4x8": _F3, "8x8": _F3,
            "8x16": (False, True, False), "16x16": (True, True, False)},
    "v4": {"2x2x1": _F3, "2x2x2": _F3, "2x2x4": _F3, "2x4x4": _F3, "4x4x4": _TT3,
           "4x4x8": _TT3, "4x4x12": _TT3, "4x8x8": _TT3, "8x8x8": _TT3, "8x8x12": _TT3,
           "8x8x16": _TT3, "8x16x16": _TT3},
}
_GRIDS["v6e"] = _GRIDS["v5e"]
_GRIDS["v5p"] = dict(_GRIDS["v4"], **{"16x16x16": _TT3})


def _table() -> dict[str, TpuSlice]:
    table = {}
    for family, (chip_config, hbm, kind, per_chip) in _FAMILIES.items():
        prefix = "v5" if family == "v5p" else family  # libtpu calls v5p "v5"
        for grid, wrap in _GRIDS[family].items():
            chips = math.prod(int(d) for d in grid.split("x"))
            name = f"{family}-{chips * per_chip}"
            bounds = (1, 1, 1) if chips == 1 else (2, 2, 1)
            table[name] = TpuSlice(name, f"{prefix}:{grid}", chip_config, bounds, wrap, hbm, kind)
    return table


TPU_SLICES: dict[str, TpuSlice] = _table()


def tpu_slice(name: str) -> TpuSlice:
    """The slice called `name` ("v5e-8"); TopologyError listing the known ones otherwise."""
    if name not in TPU_SLICES:
        families = {}
        for known in TPU_SLICES:
            families.setdefault(known.split("-")[0], []).append(known.split("-")[1])
        listing = "; ".join(f"{f}-{{{','.join(n)}}}" for f, n in families.items())
        raise TopologyError(f"--tpu {name!r} is not a known TPU slice: {listing}")
    return TPU_SLICES[name]


def libtpu_installed() -> bool:
    path = os.environ.get("TPU_LIBRARY_PATH")
    return bool(path and os.path.isfile(path)) or importlib.util.find_spec("libtpu") is not None


@contextlib.contextmanager
def _compile_only_environment(spec: TpuSlice):
    """libtpu's settings while it starts up to hand out compile-only devices, only where the
    environment does not already say; removed again afterwards (`perpo_jax.distributed` takes
    TPU_WORKER_HOSTNAMES for a TPU VM)."""
    wanted = {
        "TPU_SKIP_MDS_QUERY": "1",  # no metadata server to ask off a TPU VM
        # without these libtpu logs an INVALID_ARGUMENT "unexpected worker hostname" error
        # and a "could not determine TPU accelerator type" warning; neither changes a compile
        # (the same program compiles to the same bytes and flops with or without them)
        "TPU_WORKER_HOSTNAMES": "localhost",
        "TPU_ACCELERATOR_TYPE": spec.accelerator_type,
        # compile-only devices never open a chip: several such processes may run at once
        # (else the second one fails on /tmp/libtpu_lockfile)
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    }
    added = [k for k in wanted if k not in os.environ]
    os.environ.update({k: wanted[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


_DEVICES: dict[str, list] = {}


def slice_devices(spec: TpuSlice) -> list:
    """The slice's compile-only TPU devices (made once per process and slice)."""
    if spec.name in _DEVICES:
        return _DEVICES[spec.name]
    if not libtpu_installed():
        raise TopologyError(
            f"--tpu {spec.name} compiles with XLA's TPU compiler, which comes in the libtpu "
            f"package and it is not installed: pip install {LIBTPU_PIN} (the version jax "
            f"{jax.__version__}'s [tpu] extra pins; a TPU is not needed)")
    with _compile_only_environment(spec):
        try:
            topology = topologies.get_topology_desc(
                platform="tpu", topology_name=spec.topology, chip_config_name=spec.chip_config,
                chips_per_host_bounds=spec.host_bounds, num_slices=1, wrap=spec.wrap)
        except (RuntimeError, ValueError) as e:  # JaxRuntimeError is a RuntimeError
            raise TopologyError(f"--tpu {spec.name}: libtpu could not describe topology "
                                f"{spec.topology!r}: {str(e).splitlines()[0]}") from None
    devices = list(topology.devices)
    if len(devices) != spec.chips:
        raise TopologyError(f"--tpu {spec.name}: libtpu gave {len(devices)} devices for "
                            f"{spec.topology!r}, expected {spec.chips}")
    _DEVICES[spec.name] = devices
    return devices
