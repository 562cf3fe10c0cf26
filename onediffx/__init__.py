"""onediffx: declarative, fast Hugging Face diffusers pipelines.

The Python API kept from OneDiffX: ``compile_pipe``, ``save_pipe``, ``load_pipe``,
``compile_options``; ``onediffx.lora``; ``onediffx.deep_cache``.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `python -m onediffx list` and config errors should not pay for importing torch.compile.
    if name in ("compile_pipe", "save_pipe", "load_pipe", "compile_options", "compile_state"):
        from . import compile as _compile

        return getattr(_compile, name)
    raise AttributeError(name)
