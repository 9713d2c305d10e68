"""Reporting: comparison tables, plots and the self-contained HTML report."""
