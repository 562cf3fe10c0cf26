"""onediffx's Hydra configs, shipped as package data (``onediffx.conf``); see ``onediffx.resources``."""
