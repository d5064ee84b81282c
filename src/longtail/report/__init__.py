"""`longtail report`: a self-contained HTML report of one or more run folders (docs/report.md).

Modules: `rundata` reads a run folder, `figures` draws PNGs, `tables` formats HTML tables,
`html` assembles the page, `build` puts them together.
"""

from .build import build_report
from .rundata import RunRecord, load_run_record

__all__ = ["RunRecord", "build_report", "load_run_record"]
