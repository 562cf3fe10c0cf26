"""The ``python -m onediffx`` commands: ``run``, ``list``, ``bench``."""
