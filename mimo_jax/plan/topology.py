"""TPU chips and slice topologies: published per-chip figures, slice names, libtpu's device lists."""

from __future__ import annotations

import dataclasses
import math
import re

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Published per-chip figures (bf16 dense peak, HBM capacity and bandwidth, ICI bandwidth; the
    v4 and v6e ICI figures are assumed from their generations' links, the others are Cloud TPU's;
    v7x (TPU7x, Ironwood) from Cloud TPU's TPU7x page)."""

    generation: str
    hbm_gib: float
    peak_tflops: float
    hbm_gbps: float  # GB/s, for the roofline estimate when XLA gives no time
    cores_in_slice_name: int  # "v5p-256" counts TensorCores: 2 per chip
    torus_dims: int  # 3 for v4/v5p (3D torus), 2 for v5e/v6e
    max_chips: int  # the largest single slice
    ici_gbps: float  # bidirectional inter-chip interconnect GB/s per chip, over all its links
    ici_links: int  # ICI ports per chip
    libtpu_generation: str = ""  # the generation as libtpu's topology names spell it, when it differs


CHIPS = {
    "v4": ChipSpec("v4", 32, 275, 1200, 2, 3, 4096, 600, 6),
    "v5p": ChipSpec("v5p", 95, 459, 2765, 2, 3, 8960, 1200, 6),
    "v5e": ChipSpec("v5e", 16, 197, 819, 1, 2, 256, 400, 4),
    "v6e": ChipSpec("v6e", 32, 918, 1640, 1, 2, 256, 800, 4),
    # Ironwood: two TensorCores (libtpu devices) per chip, like v4 / v5p; "v7x-8" is 4 chips.
    "v7x": ChipSpec("v7x", 192, 2307, 7380, 2, 3, 9216, 1200, 4, libtpu_generation="tpu7x"),
}
ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e", "v5lite": "v5e", "tpu7x": "v7x"}

# Slice shapes by chip count. libtpu describes hosts of 2x2x1 chips, so 4 chips is the smallest.
SHAPES_2D = {4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}


class PlanError(ValueError):
    """A request the planner cannot satisfy (unknown topology, mesh that does not match, ...)."""


@dataclasses.dataclass(frozen=True)
class Topology:
    chip: ChipSpec
    shape: tuple[int, ...]
    requested: str

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def name(self) -> str:
        """The name libtpu's topology description takes, e.g. "v5p:4x4x8" or "tpu7x:2x2x1"."""
        return f"{self.chip.libtpu_generation or self.chip.generation}:{'x'.join(map(str, self.shape))}"


def known_topologies() -> list[str]:
    names = []
    for gen, chip in CHIPS.items():
        shapes = SHAPES_3D if chip.torus_dims == 3 else SHAPES_2D
        names += [f"{gen}-{n * chip.cores_in_slice_name}" for n in shapes if n <= chip.max_chips]
    return names


def parse_topology(name: str) -> Topology:
    """`v5p-256` (128 chips, 4x4x8), `v5e-64` (8x8), or a raw `v5p:4x4x8` name."""
    text = name.strip().lower()
    known = "known slices: " + ", ".join(known_topologies()) + "; or raw names like v5p:4x4x8, v5e:8x16"
    m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)+))", text)
    if not m:
        raise PlanError(f"topology {name!r} is not of the form <generation>-<size> or <generation>:<AxB[xC]>; {known}")
    gen = ALIASES.get(m.group(1), m.group(1))
    if gen not in CHIPS:
        raise PlanError(f"unknown TPU generation {m.group(1)!r} in {name!r} (known: {', '.join(CHIPS)}); {known}")
    chip = CHIPS[gen]
    shapes = SHAPES_3D if chip.torus_dims == 3 else SHAPES_2D
    if m.group(2) is not None:
        count = int(m.group(2))
        unit = "TensorCores (2 per chip)" if chip.cores_in_slice_name == 2 else "chips"
        chips, rem = divmod(count, chip.cores_in_slice_name)
        if rem or chips not in shapes or chips > chip.max_chips:
            valid = ", ".join(f"{gen}-{n * chip.cores_in_slice_name}" for n in shapes if n <= chip.max_chips)
            raise PlanError(f"{name!r}: {gen} slice sizes count {unit}; no slice of {count} (valid: {valid})")
        return Topology(chip, shapes[chips], name)
    shape = tuple(int(d) for d in m.group(3).split("x"))
    if len(shape) != chip.torus_dims or 0 in shape:
        example = "x".join(map(str, shapes[64 if chip.torus_dims == 3 else 16]))
        raise PlanError(f"{name!r}: {gen} topologies have {chip.torus_dims} dimensions, e.g. {gen}:{example}")
    if shape[0] % 2 or shape[1] % 2:
        raise PlanError(f"{name!r}: hosts hold 2x2 chips, so the first two dimensions must be even")
    return Topology(chip, shape, name)


def topology_devices(topology: Topology):
    from kernels_pallas.tpu_aot import tpu_topology  # libtpu path: loads libtpu, only when a plan compiles

    return list(tpu_topology(topology.name).devices)
