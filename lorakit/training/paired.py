"""What the preference objectives (DPO, KTO, ORPO) share: a prompt with two answers per example,
their log-probabilities under the policy and under the reference, and TRL's trainer call.

An example holds `prompt_ids` and two answers: DPO's and ORPO's chosen and rejected, KTO's
completion and the completion of another row (its KL estimate). A batch lays its rows out as
[every first answer; every second answer] (TRL's concatenated layout): packed on their prompts
(lorakit.training.pairs) where the model allows, else as 2B padded rows. The reference is the same
model with its adapters switched off (never a copy of the base), computed per batch, or once
before training and kept with the data and in checkpoints; or the model as given, when it arrives
with an adapter to improve on (`from_start`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from lorakit.data.preference import PreferenceData, prepare_preferences
from lorakit.errors import ConfigError
from lorakit.training import trl_call
from lorakit.training.config import TrainConfig
from lorakit.training.launch import Launch, resolve_launch
from lorakit.training.loop import Trainer
from lorakit.training.loss import head_token_logps, split_head
from lorakit.training.objective import Batch, Objective
from lorakit.training.pairs import pack_pairs
from lorakit.training.prefix import as_attention_mask, prefix_sharing_problem


def token_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p of each scored token, its row in the [first; second] layout, whether it is an
    answer token), from a packed batch or a padded one; the output head runs on the scored
    positions only, chunked (lorakit.training.loss.head_token_logps). Padded rows score their
    answer tokens, or `score_mask`'s where given."""
    if "seen" in batch:
        backbone, head = split_head(model)
        hidden = backbone(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=as_attention_mask(batch["seen"], backbone)[None, None],
            use_cache=False,
        ).last_hidden_state[0]
        token = head_token_logps(hidden[batch["pred"]], head, batch["targets"])
        return token, batch["rows"], batch["answer"]
    ids = batch["input_ids"]
    score = batch.get("score_mask", batch["completion_mask"])[:, 1:].bool()
    kwargs = {"attention_mask": batch["attention_mask"], "use_cache": False}
    targets = ids[:, 1:][score]
    parts = split_head(model)
    if parts is None:  # a model that post-processes its logits: its own forward
        logits = model(input_ids=ids, **kwargs).logits[:, :-1][score].float()
        token = logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    else:
        backbone, head = parts
        hidden = backbone(input_ids=ids, **kwargs).last_hidden_state[:, :-1][score]
        token = head_token_logps(hidden, head, targets)
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(score)[score]
    answer = batch["completion_mask"][:, 1:][score].bool()
    return token, rows, answer


def answer_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log p over each row's answer tokens, the number of those tokens) for every row of
    the [first; second] layout."""
    token, rows, answer = token_logps(model, batch)
    n = batch["n"] if "n" in batch else batch["completion_mask"].sum(1)
    sums = torch.zeros(len(n), device=token.device).index_add(0, rows[answer], token[answer])
    return sums, n


class PairedObjective(Objective):
    """Batches of a prompt with two answers, and their reference log-probs (see the module
    docstring). Subclasses name the answers and compute the loss."""

    needs_reference = True
    answers = ("chosen_ids", "rejected_ids")
    unit = "pairs"  # what count() counts, in the eval metrics' name

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        args: TrainConfig,
        options: Any,
        from_start: bool = False,
    ) -> None:
        """options: the objective's own settings (its Config is its own options). from_start:
        the reference is the model as given (its adapters on), its log-probs computed once
        before training; otherwise the model with its adapters off, per batch or once
        (options.precompute_ref_log_probs)."""
        self.model, self.tokenizer, self.args, self.options = model, tokenizer, args, options
        self.from_start = from_start
        precompute = getattr(options, "precompute_ref_log_probs", False)
        self.precompute = self.needs_reference and (from_start or precompute)
        self.data: dict[str, Any] = {}
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (getattr(tokenizer, "eos_token_id", 0) or 0)
        # why examples are not packed on their prompts (None: they are)
        self.pack_off = (
            "share_prefix=False"
            if not args.share_prefix
            else "the model post-processes its logits"
            if split_head(model.model) is None
            else prefix_sharing_problem(model.model, training=True)
        )

    def prepare(self, data: Any, split: str) -> Any:
        """Preference pairs (lorakit.data.preference) as token ids."""
        if isinstance(data, PreferenceData):
            return data
        if self.tokenizer is None:
            raise ConfigError(f"{split} data is not tokenized yet: pass processing_class=")
        return prepare_preferences(data, self.tokenizer, self.args.max_length)

    def collate(self, examples: list[dict]) -> Batch:
        """The examples packed on their prompts (lorakit.training.pairs) where the model allows,
        else 2B padded rows: each prompt + first answer, then each prompt + second answer, cut
        at max_length; completion_mask marks the answer tokens (TRL's layout)."""
        packed = None
        if not self.pack_off:
            packed = pack_pairs(examples, self.args.max_length, self.answers, self.prompt_scored)
        batch = packed if packed is not None else self._padded(examples)
        if all("ref_logps" in e for e in examples):  # precomputed: [first..., second...]
            batch["ref_logps"] = torch.tensor([e["ref_logps"] for e in examples]).t().flatten()
        return batch | self.extra_columns(examples)

    prompt_scored = False  # ORPO: the first row's prompt tokens are scored too

    def extra_columns(self, examples: list[dict]) -> Batch:
        """Per-example tensors a subclass's loss needs (KTO: the labels)."""
        return {}

    def _padded(self, examples: list[dict]) -> Batch:
        rows, masks = [], []
        for key in self.answers:
            for e in examples:
                rows.append((e["prompt_ids"] + e[key])[: self.args.max_length])
                masks.append(([0] * len(e["prompt_ids"]) + [1] * len(e[key]))[: len(rows[-1])])
        width = max(map(len, rows))
        pad = [width - len(r) for r in rows]
        batch = {
            "input_ids": torch.tensor([r + [self.pad_id] * p for r, p in zip(rows, pad)]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * p for r, p in zip(rows, pad)]),
            "completion_mask": torch.tensor([m + [0] * p for m, p in zip(masks, pad)]),
        }
        if self.prompt_scored:  # every token of the first rows, the answers of the others
            first = torch.arange(len(rows))[:, None] < len(examples)
            batch["score_mask"] = torch.where(
                first, batch["attention_mask"], batch["completion_mask"]
            )
        return batch

    def filler(self, data: Any) -> Batch:
        """One example that scores nothing (no scored token: nothing counts)."""
        batch = self._padded([data[0]]) | self.extra_columns([data[0]])
        batch["completion_mask"] = torch.zeros_like(batch["completion_mask"])
        if "score_mask" in batch:
            batch["score_mask"] = torch.zeros_like(batch["score_mask"])
        return batch

    def count(self, batch: Batch) -> tuple[int, int]:
        """(examples with first-answer tokens, tokens through the model)."""
        if "seen" in batch:
            return int((batch["n"].chunk(2)[0] > 0).sum()), batch["input_ids"].numel()
        examples = int(batch["completion_mask"].chunk(2)[0].any(dim=1).sum())
        return examples, int(batch["attention_mask"].sum())

    def policy_and_reference(
        self, model: nn.Module, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(policy log-probs, reference log-probs, answer tokens) of every row. The reference runs
        first: its activations are freed before the policy's, kept for backward, build up."""
        ref = batch.get("ref_logps")
        if ref is None:
            with torch.no_grad(), model.disable_adapters():
                ref, _ = answer_logps(model.model, batch)
        logps, n = answer_logps(model.model, batch)
        return logps, ref, n

    def start(self, model, data, saved: dict[str, torch.Tensor], autocast) -> None:
        """The reference's log-probs of every example, once: from the resumed checkpoint, or
        computed now (the model as given, or with its adapters off)."""
        self.data = data
        if not self.precompute:
            return
        for split, prepared in data.items():
            if prepared is None or all("ref_logps" in e for e in prepared.examples):
                continue
            values = saved.get(f"{split}.ref_logps")
            if values is None or len(values) != len(prepared):
                values = self._reference_logps(model, prepared, autocast)
            for e, v in zip(prepared.examples, values.tolist()):
                e["ref_logps"] = v

    @torch.no_grad()
    def _reference_logps(self, model, data: Any, autocast) -> torch.Tensor:
        """[examples, 2]: the reference's log-probs of both answers of every example."""
        size = self.options.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        device = next(model.parameters()).device
        off = contextlib.nullcontext() if self.from_start else model.disable_adapters()
        out = []
        with off, autocast():
            for lo in range(0, len(data), size):
                batch = self.collate(data.examples[lo : lo + size])
                batch = {k: v.to(device) for k, v in batch.items() if k != "ref_logps"}
                out.append(torch.stack(answer_logps(model.model, batch)[0].float().chunk(2), 1))
        return torch.cat(out).cpu()

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {
            f"{split}.ref_logps": torch.tensor([e["ref_logps"] for e in data.examples])
            for split, data in self.data.items()
            if data is not None and self.precompute and all("ref_logps" in e for e in data.examples)
        }

    def eval_metrics(self, loss: float, count: int, sums: dict[str, float]) -> dict[str, float]:
        n = max(count, 1)
        means = self.log_metrics({k: v / n for k, v in sums.items()})
        return {"eval_loss": loss / n, f"eval_{self.unit}": count} | {
            f"eval_{k}": v for k, v in means.items()
        }


class PreferenceTrainer(Trainer):
    """TRL's preference-trainer call (DPOTrainer's, KTOTrainer's) on lorakit's loop. Subclasses
    name their objective, config and options classes."""

    objective_class: type[PairedObjective]
    config_class: type[TrainConfig]
    options_class: type

    def __init__(
        self,
        model,
        ref_model: Any = None,
        args: TrainConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Any = None,
        callbacks: list[Any] | None = None,
        optimizers: Any = (None, None),
        peft_config: Any = None,
        launch: Launch | None = None,
        options: Any = None,
        reference: str | None = None,
    ) -> None:
        """TRL's call, plus lorakit's: `args` a TrainConfig with the objective's `options`
        beside it (its Config is both), `launch` the run's placement, `reference` "base"
        (adapters off) or "start" (the model as given; the default for a model that arrives
        with its adapters)."""
        self._setup(
            model, args, (train_dataset, eval_dataset), processing_class, callbacks, peft_config,
            launch, options, reference, ref_model=ref_model, data_collator=data_collator,
            compute_metrics=compute_metrics, optimizers=optimizers,
        )  # fmt: skip

    def _setup(
        self, model, args, data, processing_class, callbacks, peft_config, launch, options,
        reference: str | None, **refused: Any,
    ) -> None:  # fmt: skip
        """`refused`: TRL's arguments lorakit does not take, failing by name when given. A
        model that arrives with its adapters (an SFT adapter to improve on) is its own
        reference as it is now ("start"); fresh adapters (peft_config) have the base as theirs
        ("base")."""
        name = type(self).__name__
        for key, value in refused.items():
            if value is not None and value != (None, None):
                raise ConfigError(f"{name}: {key} is not supported: {_WHY_REFUSED[key]}")
        args = args or self.config_class()
        options = options or (args if isinstance(args, self.options_class) else None)
        options = options or self.options_class()
        reference = reference or ("base" if peft_config is not None else "start")
        if reference not in ("base", "start"):
            raise ConfigError(f"{name}: reference={reference!r}: use 'base' or 'start'")
        model, tokenizer = trl_call.lora_model_for(model, args, peft_config, processing_class)
        if getattr(args, "disable_dropout", False):
            disable_dropout(model)
        objective = self.objective_class(
            model, tokenizer, args, options, from_start=reference == "start"
        )
        self.tokenizer = tokenizer
        launch = launch if launch is not None else resolve_launch(args)
        super().__init__(model, objective, args, *data, launch, callbacks)


_WHY_REFUSED = {
    "ref_model": "the reference is the model with its adapters switched off (no second copy "
    "of the base)",
    "data_collator": "lorakit batches preference examples itself",
    "compute_metrics": "lorakit logs TRL's metrics of the objective",
    "optimizers": "lorakit builds AdamW from the config",
    "model_init": "pass the model (object, id or path)",
    "preprocess_logits_for_metrics": "lorakit logs TRL's metrics of the objective",
}


def disable_dropout(model: nn.Module) -> None:
    """TRL's disable_dropout: every dropout of the model (its own and the adapters') off."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
