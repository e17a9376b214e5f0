"""What a finished run shows a person: PNG plots (``plots``) and plain-text tables (``tables``)."""

from .plots import plot_confusion_matrix, plot_rank_spectra, plot_training_curves, plt, save_figure
from .tables import format_table, read_metrics_csv

__all__ = ["format_table", "plot_confusion_matrix", "plot_rank_spectra", "plot_training_curves", "plt",
           "read_metrics_csv", "save_figure"]
