"""The report: what each check found, in a form every rank agrees on."""

from smpcheck.report.model import CheckResult, Finding, Report, Status

__all__ = ["CheckResult", "Finding", "Report", "Status"]
