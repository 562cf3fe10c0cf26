"""Where the packaged ``conf/`` and ``plugins/`` folders are, in a wheel, an editable install or a clone.

Both folders stay at the top of the repository and ship as the packages ``onediffx.conf`` and
``onediffx.plugins`` (``pyproject.toml`` maps them). Installed (wheel or editable) they import
like any package. A source checkout used without installing (``PYTHONPATH=<clone>``, as on the
GPU machine) has no such packages: they are then bound to the checkout's own folders, and only
when this module sits in a checkout of onediffx (its ``pyproject.toml`` beside the folders), so
nothing is ever read from a folder that merely happens to lie next to ``site-packages``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from types import ModuleType

from .errors import NotAvailableError

CONF = "onediffx.conf"
PLUGINS = "onediffx.plugins"


def _checkout_folder(name: str) -> Path | None:
    """``<clone>/<name>`` when this file runs from a source checkout of onediffx, else None."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    folder = root / name
    if not (pyproject.is_file() and (folder / "__init__.py").is_file()):
        return None
    return folder if 'name = "onediffx"' in pyproject.read_text(encoding="utf-8") else None


@lru_cache(maxsize=None)
def package(qualified: str) -> ModuleType:
    """Import ``onediffx.conf`` or ``onediffx.plugins``, binding a checkout's folder when not installed."""
    if importlib.util.find_spec(qualified) is not None:
        return importlib.import_module(qualified)
    folder = _checkout_folder(qualified.rsplit(".", 1)[1])
    if folder is None:
        raise NotAvailableError(f"{qualified} is missing from this installation; reinstall onediffx "
                                "(pip install --force-reinstall onediffx)")
    spec = importlib.util.spec_from_file_location(qualified, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module
    spec.loader.exec_module(module)
    return module


def conf_dir() -> Path:
    """The packaged Hydra config folder (``run.yaml``, ``model/``, ``compile/``, ...)."""
    package(CONF)
    return Path(str(files(CONF)))


def plugins_dir() -> Path:
    """The packaged first-party plugin folder."""
    package(PLUGINS)
    return Path(str(files(PLUGINS)))
