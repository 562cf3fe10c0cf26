"""First-party plugins, shipped as ``onediffx.plugins``: ``plugins: [vae_tiling]`` imports ``onediffx.plugins.vae_tiling``.

A plugin is a module that registers stages or compile backends when imported; copy ``vae_tiling``
to write one. Third-party plugins register through the ``onediffx.plugins`` entry-point group.
"""
