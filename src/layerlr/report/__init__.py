"""Reporting: what each variable gets and how far it moves.

The summary table (`_summary`), per-layer update measurements (`_updates`),
callbacks and plots. Reads the resolved assignment through the public
``LayerwiseOptimizer.resolve``; never the optimizer's private state.
"""
