"""The compiled-graph cache: entries keyed by everything a loaded graph depends on, signed, checked.

``key``: what invalidates a graph (versions, card, CPU ISA, thread count and the rest of Dynamo's
process state), so a hit compiles nothing. ``manifest``: the schema every manifest passes before
any file is read. ``trust``: folder permissions and the HMAC that only this user's key can make.
``kernels``: Inductor's built C++ kernels, bundled so a restart does not rebuild them. ``store``:
``GraphCache``, the folder itself (atomic locked writes, read-only folders, quarantine).
"""

from .key import FORMAT, config_digest, environment_key, key_hash, process_state
from .store import GraphCache, Loaded
from .trust import default_key_file

__all__ = ["FORMAT", "GraphCache", "Loaded", "config_digest", "default_key_file", "environment_key", "key_hash",
           "process_state"]
