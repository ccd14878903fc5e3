"""Training callbacks as transformers' Trainer calls them, so `callbacks=[...]` written for HF
Trainer / TRL work on lorakit's loop.

A callback is any object with some of the methods on_train_begin, on_step_begin, on_step_end,
on_log, on_evaluate, on_save, on_train_end (a `transformers.TrainerCallback` subclass has them
all); each is called as `method(args, state, control, **kwargs)` with the run's SFTConfig /
TrainConfig, the trainer's TrainState and a `TrainerControl`, plus model, processing_class,
optimizer and lr_scheduler as keywords, `logs=` for on_log and `metrics=` for on_evaluate. A
callback steers the loop through `control`:
- should_training_stop (checked after each step's log, evaluation and save): training ends
  there, as if max_steps had been reached (final evaluation, checkpoint and adapter saved);
- should_log, should_evaluate, should_save: do that at this step as well (reset every step).
A method may return the control object, as HF allows; the returned one is used from then on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

EVENTS = (
    "on_train_begin",
    "on_step_begin",
    "on_step_end",
    "on_log",
    "on_evaluate",
    "on_save",
    "on_train_end",
)


@dataclass
class TrainerControl:
    """What callbacks ask of the loop (transformers' field names)."""

    should_training_stop: bool = False
    should_log: bool = False
    should_evaluate: bool = False
    should_save: bool = False


class CallbackList:
    """The one place that calls callbacks: in order, each event to every callback that has it."""

    def __init__(self, callbacks: Iterable[Any] | None = None) -> None:
        self.callbacks: list[Any] = []
        self.control = TrainerControl()
        self.context: dict[str, Any] = {}  # keywords every call gets (model, optimizer, ...)
        for callback in callbacks or ():
            self.add(callback)

    def add(self, callback: Any) -> None:
        """A callback object, or a class to instantiate without arguments (as HF takes them)."""
        callback = callback() if isinstance(callback, type) else callback
        if not any(callable(getattr(callback, event, None)) for event in EVENTS):
            raise TypeError(
                f"{type(callback).__name__} is not a callback: it has none of {', '.join(EVENTS)}"
            )
        self.callbacks.append(callback)

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def fire(self, event: str, args: Any, state: Any, **kwargs: Any) -> TrainerControl:
        if event == "on_train_begin":
            self.control = TrainerControl()
        elif event == "on_step_begin":
            c = self.control
            c.should_log = c.should_evaluate = c.should_save = False
        for callback in self.callbacks:
            method = getattr(callback, event, None)
            if method is not None:
                result = method(args, state, self.control, **self.context, **kwargs)
                if result is not None:
                    self.control = result
        return self.control
