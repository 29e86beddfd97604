"""Parameter sweeps as job arrays: a grid becomes one array job, split when it is larger than
the cluster's MaxArraySize (array indices must stay below it)."""
from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Mapping, Sequence

from slurm.errors import SpecError
from slurm.spec import JobSpec


def expand_grid(grid: Mapping[str, Sequence]) -> list[dict[str, str]]:
    """``{"lr": [0.1, 0.01], "bs": [32]}`` -> ``[{"lr": "0.1", "bs": "32"}, {"lr": "0.01", "bs": "32"}]``
    (the order of the keys is kept; the last key varies fastest)."""
    if not grid:
        raise SpecError("sweep", grid, "a sweep needs at least one parameter with values")
    for k, values in grid.items():
        if isinstance(values, (str, bytes)) or not len(values):
            raise SpecError("sweep", k, "give a non-empty list of values")
    keys = list(grid)
    return [dict(zip(keys, (str(v) for v in combo))) for combo in itertools.product(*(grid[k] for k in keys))]


def array_specs(base: JobSpec, grid: Mapping[str, Sequence], max_array_size: int,
                max_parallel: int | None = None) -> list[JobSpec]:
    """One array spec per chunk of at most ``max_array_size`` tasks (indices 0..n-1 each)."""
    if max_array_size < 1:
        raise SpecError("max_array_size", max_array_size, "must be at least 1")
    tasks = expand_grid(grid)
    specs = []
    for start in range(0, len(tasks), max_array_size):
        chunk = tasks[start:start + max_array_size]
        array = "0-%d" % (len(chunk) - 1)
        if max_parallel:
            array += "%%%d" % max_parallel
        name = base.name if len(tasks) <= max_array_size else "%s.%d" % (base.name[:120], start // max_array_size)
        specs.append(replace(base, name=name, array=array, array_offset=start,
                             sweep=tuple(tuple(t.items()) for t in chunk)))
    return specs
