"""Batch prompts (``prompts=file.jsonl``): the prompts file, the manifest journal, the runner."""
