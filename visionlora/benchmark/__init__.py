"""Few-shot classification benchmark: protocols (k-shot sweep, episodes, Omniglot one-shot runs), methods, results."""

from .cells import Backbone, Budget, CellData, CellResult, run_cell
from .methods import MethodSpec, parse_method
from .protocols import PROTOCOLS, draw_episode, episodic_cells, kshot_cells, omniglot_cells
from .results import ResultsLog, markdown_table, mean_ci, summarise
from .sweep import OMNIGLOT_REFERENCES, SweepConfig, run_sweep

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
    "draw_episode",
    "episodic_cells",
    "kshot_cells",
    "markdown_table",
    "mean_ci",
    "omniglot_cells",
    "parse_method",
    "run_cell",
    "run_sweep",
    "summarise",
]
