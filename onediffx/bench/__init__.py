"""Benchmarks that compare onediffx with its peers in one process (``python -m onediffx bench``)."""
