"""Region recipes by name: how stage 1 turns one image's patch features into regions.

- ``paper``: HASSOD's pseudo-labels (:class:`.pipeline.DiscoverySettings`):
  the backbone's thresholds, a DenseCRF per threshold, the coverage tree.
  The default of ``hassod discover``, whose output trains the detector.
- ``search``: every distinct region of the merge hierarchy at a dense set of
  thresholds, ranked by objectness, patch masks, no CRF
  (:class:`.search.SearchSettings`). The default of ``hassod index build``.

Both settings classes answer ``recipe`` (the name), ``as_dict()``,
``for_backbone(backbone)`` (thresholds filled in), ``input_size`` and
``find(image, features, original_size)`` → :class:`.pipeline.Discovered`.
"""
from __future__ import annotations

from typing import Any, Union

from ..errors import UserError
from . import RECIPES
from .pipeline import DiscoverySettings
from .search import SearchSettings

RegionRecipe = Union[DiscoverySettings, SearchSettings]


class RecipeError(UserError, ValueError):
    """Settings that the named recipe does not take; ``str()`` is a one-line message."""


def recipe_settings(
    name: str, thresholds: tuple[float, ...] | None = None, max_regions: int | None = None
) -> RegionRecipe:
    """The settings of recipe ``name`` with the command line's optional overrides."""
    if name == "paper":
        if max_regions is not None:
            raise RecipeError("--max-regions applies to the search recipe only (paper keeps every mask it finds)")
        return DiscoverySettings(thresholds=thresholds)
    if name == "search":
        extra = {} if max_regions is None else {"max_regions": max_regions}
        return SearchSettings(thresholds=thresholds, **extra)
    raise RecipeError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")


def settings_from_dict(saved: dict[str, Any] | None) -> RegionRecipe:
    """Settings back from :meth:`as_dict` (as an index records them); ``None`` or no ``recipe`` key: ``paper``.

    Only the ``search`` recipe's settings are restored in full; ``paper``
    restores its thresholds (the rest are its defaults, as before recipes).
    """
    saved = dict(saved or {})
    thresholds = tuple(saved["thresholds"]) if saved.get("thresholds") else None
    if saved.get("recipe", "paper") == "paper":
        return DiscoverySettings(thresholds=thresholds)
    saved.pop("recipe")
    return SearchSettings(**{**saved, "thresholds": thresholds})
