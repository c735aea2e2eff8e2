"""Experiment protocols on top of single runs: suites (configs x seeds), tuning, BP-twin comparisons."""
