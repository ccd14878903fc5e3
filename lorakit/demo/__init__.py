"""The README demo: a small date-normalisation task that LoRA visibly learns in minutes on CPU.

Owns: the task's rows and the demo run. May import every layer below it (base ... serving);
imported by cli only.
"""

from lorakit.demo.task import DEMO_DEFAULTS, make_task, reference

__all__ = ["DEMO_DEFAULTS", "make_task", "reference"]
