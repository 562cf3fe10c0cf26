"""Compile backends (registered by name) and the compiled-graph cache."""
