"""Sweeps over compression x privacy settings: tables, reports and plots."""
