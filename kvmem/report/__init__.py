"""The offline HTML report of a profile run (``kvmem report``) and its Plotly figures.

    from kvmem.report import build_report, figures, prompt_page
"""

from kvmem.report import figures
from kvmem.report.data import ReportOptions
from kvmem.report.html import Report, build_report
from kvmem.report.prompt import prompt_page

__all__ = ["Report", "ReportOptions", "build_report", "figures", "prompt_page"]
