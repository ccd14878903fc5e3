"""The README demo: a small date-normalisation task that LoRA visibly learns in minutes on CPU."""

from lorakit.demo.task import (DEMO_DEFAULTS, exact_match, exact_match_rate,
                               generate_predictions, make_task, reference)

__all__ = ["DEMO_DEFAULTS", "exact_match", "exact_match_rate", "generate_predictions",
           "make_task", "reference"]
