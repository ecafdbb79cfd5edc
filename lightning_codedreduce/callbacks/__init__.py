"""Lightning callbacks: see who straggled (``StragglerMonitor``) and make ranks straggle (``StragglerInjector``)."""
from .injector import StragglerInjector
from .monitor import StragglerMonitor
from .report import format_summary, merge_csv, plot_stragglers, read_rows, summarize

__all__ = ["StragglerInjector", "StragglerMonitor", "format_summary", "merge_csv", "plot_stragglers", "read_rows",
           "summarize"]
