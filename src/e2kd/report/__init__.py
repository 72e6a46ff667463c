"""Reports: explanation figures, metric curves, results tables and the self-contained HTML page.

The top layer: it may import everything below it (train, metrics, models, the core); nothing but
the command line imports it.
"""

from .figures import curve_figure, explanation_figure, normalise_map, training_curves_figure
from .html import load_run, render_html, write_html_report
from .tables import format_cell, group_seeds, markdown_table, mean_std, terminal_table

__all__ = [
    "curve_figure",
    "explanation_figure",
    "format_cell",
    "group_seeds",
    "load_run",
    "markdown_table",
    "mean_std",
    "normalise_map",
    "render_html",
    "terminal_table",
    "training_curves_figure",
    "write_html_report",
]
