"""Recipes: whole runs assembled from the layers below, once, in the order they happen (torchtune's
recipes are the model). `SFTRecipe` is what `lorakit train`, the demo and scripts run.

Owns: the order of a run's steps. May import every layer below it (base ... serving); imported
by demo and cli.
"""

from lorakit.recipes.sft import Outcome, SFTRecipe, summary_lines

__all__ = ["Outcome", "SFTRecipe", "summary_lines"]
