"""Reports of scored datasets: Markdown, HTML and PNG plots (matplotlib is imported here only, lazily)."""

from .build import Report, ReportArguments, build_report

__all__ = ["Report", "ReportArguments", "build_report"]
