"""YAML recipes: inheritance, dotted overrides and a typed schema checked before anything starts."""

from megatron_ring.recipe.loader import RecipeError, dump, load_recipe

__all__ = ["RecipeError", "dump", "load_recipe"]
