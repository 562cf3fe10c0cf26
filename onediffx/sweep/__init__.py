"""Multirun sweeps that answer a question: GPU pinning per job, and the summary written at the end.

The summary callback (``callback.SweepSummary``) is registered in ``conf/run.yaml``; it imports the
heavy libraries (scikit-image, matplotlib) only when a multirun ends.
"""
