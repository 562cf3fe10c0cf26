"""Open quantization (fp8, int8) of a pipeline's heavy components through torchao: ``quantize_pipe``.

Exports load on first use, so composing a config (which reads ``config``) imports neither torch
nor torchao.
"""

from ..lazy_exports import lazy_getattr

_EXPORTS = {
    "quantize_pipe": "pipe",
    "quantize_state": "pipe",
    "QuantizeState": "pipe",
    "QuantizeConfig": "config",
    "QuantizeMode": "config",
    "KeepOriginals": "config",
}

__getattr__ = lazy_getattr(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
