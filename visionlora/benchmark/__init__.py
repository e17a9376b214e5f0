"""Few-shot classification benchmark: protocols (k-shot sweep, episodes, Omniglot one-shot runs), methods, results."""

from .cells import Backbone, Budget, CellData, CellResult, run_cell
from .methods import MethodSpec, parse_method
from .protocols import PROTOCOLS, draw_episode, episodic_cells, kshot_cells, omniglot_cells
from .results import ResultsLog, markdown_table, mean_ci, summarise
from .sweep import OMNIGLOT_REFERENCES, SweepConfig, SweepOutcome, SweepPlan, execute_sweep, prepare_sweep, run_sweep

__all__ = [
    "OMNIGLOT_REFERENCES",
    "PROTOCOLS",
    "Backbone",
    "Budget",
    "CellData",
    "CellResult",
    "MethodSpec",
    "ResultsLog",
    "SweepConfig",
    "SweepOutcome",
    "SweepPlan",
    "draw_episode",
    "episodic_cells",
    "execute_sweep",
    "kshot_cells",
    "markdown_table",
    "mean_ci",
    "omniglot_cells",
    "parse_method",
    "prepare_sweep",
    "run_cell",
    "run_sweep",
    "summarise",
]
