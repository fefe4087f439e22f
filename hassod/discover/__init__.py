"""Stage 1: regions from patch features without labels (see :mod:`hassod.discover.recipes`)."""

RECIPES = ("paper", "search")
"""The region recipes by name (:mod:`hassod.discover.recipes`); here so that a command line can list them
without importing discovery."""
