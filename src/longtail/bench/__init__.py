"""`longtail bench`: run a grid of methods x imbalance ratios x seeds and tabulate it (docs/bench.md).

Modules: `grid` reads and validates a grid file into cells, `runner` runs them (skipping
finished cells, resuming interrupted ones, sharing stage-1 runs), `table` writes the
mean ± std tables.
"""

from .grid import Cell, Grid, MethodSpec, load_grid
from .runner import cell_state, plan, run_grid
from .table import collect, write_tables

__all__ = ["Cell", "Grid", "MethodSpec", "cell_state", "collect", "load_grid", "plan", "run_grid", "write_tables"]
