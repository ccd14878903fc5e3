"""Direct preference optimisation on adapters: DPO's objective, and `DPOTrainer` (TRL's call).

A pair is a prompt with a chosen and a rejected answer; its log-probabilities are summed over
each answer's tokens, under the policy (the model with its adapters) and under the reference (the
same model with its adapters switched off: no second copy of the base). With
r = log π(answer) − log π_ref(answer) and Δ = r_chosen − r_rejected, per pair (TRL's losses):
- sigmoid: −log σ(βΔ) (the paper's);
- hinge:   max(0, 1 − βΔ);
- ipo:     (r_chosen / n_chosen − r_rejected / n_rejected − 1/(2β))², n: answer tokens;
- robust:  (−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε), ε = label_smoothing.
Several losses combine as Σ weight_k · loss_k. The loss is summed over pairs; the loop divides by
the step's pairs, so a step is the mean over its global batch. Metrics are TRL's:
rewards/chosen, rewards/rejected (β·r), rewards/accuracies, rewards/margins, logps/chosen,
logps/rejected.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data.preference import PreferenceData, prepare_preferences
from lorakit.errors import ConfigError
from lorakit.training import trl_call
from lorakit.training.config import DPO_LOSS_TYPES as LOSS_TYPES
from lorakit.training.config import DPOConfig, DPOOptions, TrainConfig
from lorakit.training.launch import Launch, resolve_launch
from lorakit.training.loop import Trainer
from lorakit.training.loss import split_head
from lorakit.training.objective import Batch, Objective, Terms
from lorakit.training.pairs import pack_pairs
from lorakit.training.prefix import as_attention_mask, prefix_sharing_problem

METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def pair_loss(kind: str, r_c, r_r, n_c, n_r, beta: float, smoothing: float) -> torch.Tensor:
    """One loss type's value for each pair, from the log-ratios r and answer lengths n."""
    delta = r_c - r_r
    if kind == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if kind == "hinge":
        return torch.relu(1 - beta * delta)
    if kind == "ipo":
        return (r_c / n_c - r_r / n_r - 1 / (2 * beta)) ** 2
    if kind == "robust":
        return (
            -(1 - smoothing) * F.logsigmoid(beta * delta) + smoothing * F.logsigmoid(-beta * delta)
        ) / (1 - 2 * smoothing)
    raise ConfigError(f"loss_type {kind!r}: lorakit has {LOSS_TYPES}")


def answer_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log p over each row's answer tokens, the number of those tokens) for every row of
    the [chosen; rejected] layout, from a packed batch (lorakit.training.pairs) or a padded one;
    the output head runs on answer positions only."""
    if "seen" in batch:
        return _packed_answer_logps(model, batch)
    ids, mask = batch["input_ids"], batch["completion_mask"][:, 1:].bool()
    kwargs = {"attention_mask": batch["attention_mask"], "use_cache": False}
    parts = split_head(model)
    if parts is None:  # a model that post-processes its logits: its own forward
        logits = model(input_ids=ids, **kwargs).logits[:, :-1][mask]
    else:
        backbone, head = parts
        hidden = backbone(input_ids=ids, **kwargs).last_hidden_state[:, :-1][mask]
        logits = head(hidden)
    logits = logits.float()
    targets = ids[:, 1:][mask]
    token = logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(mask)[mask]
    sums = torch.zeros(ids.shape[0], device=ids.device).index_add(0, rows, token)
    return sums, mask.sum(1)


def _packed_answer_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    backbone, head = split_head(model)
    hidden = backbone(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=as_attention_mask(batch["seen"], backbone)[None, None],
        use_cache=False,
    ).last_hidden_state[0]
    logits = head(hidden[batch["pred"]]).float()
    targets = batch["targets"]
    token = logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    sums = torch.zeros(len(batch["n"]), device=token.device).index_add(0, batch["rows"], token)
    return sums, batch["n"]


class DPOObjective(Objective):
    needs_reference = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        args: TrainConfig,
        options: DPOOptions,
        from_start: bool = False,
    ) -> None:
        """options: beta, the losses, precomputing (a DPOConfig is its own options).
        from_start: the reference is the model as given (its adapters on: an SFT adapter to
        improve on), its log-probs computed once before training; otherwise the model with
        its adapters off, per batch or once (options.precompute_ref_log_probs)."""
        self.model, self.tokenizer, self.args, self.options = model, tokenizer, args, options
        self.from_start = from_start
        self.precompute = from_start or options.precompute_ref_log_probs
        self.data: dict[str, PreferenceData | None] = {}
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (getattr(tokenizer, "eos_token_id", 0) or 0)
        weights = options.loss_weights or [1.0] * len(options.loss_type)
        self.losses = list(zip(options.loss_type, weights))
        # why pairs are not packed on their prompts (None: they are)
        self.pack_off = (
            "share_prefix=False"
            if not args.share_prefix
            else "the model post-processes its logits"
            if split_head(model.model) is None
            else prefix_sharing_problem(model.model, training=True)
        )

    def prepare(self, data: Any, split: str) -> PreferenceData:
        if isinstance(data, PreferenceData):
            return data
        if self.tokenizer is None:
            raise ConfigError(f"{split} data is not tokenized yet: pass processing_class=")
        return prepare_preferences(data, self.tokenizer, self.args.max_length)

    def collate(self, examples: list[dict]) -> Batch:
        """The pairs packed on their prompts (lorakit.training.pairs) where the model allows,
        else 2B padded rows: each pair's prompt + chosen, then each pair's prompt + rejected,
        cut at max_length; completion_mask marks the answer tokens (TRL's layout)."""
        packed = None if self.pack_off else pack_pairs(examples, self.args.max_length)
        batch = packed if packed is not None else self._padded(examples)
        if all("ref_logps" in e for e in examples):  # precomputed: [chosen..., rejected...]
            batch["ref_logps"] = torch.tensor([e["ref_logps"] for e in examples]).t().flatten()
        return batch

    def _padded(self, examples: list[dict]) -> Batch:
        rows, masks = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for e in examples:
                rows.append((e["prompt_ids"] + e[key])[: self.args.max_length])
                masks.append(([0] * len(e["prompt_ids"]) + [1] * len(e[key]))[: len(rows[-1])])
        width = max(map(len, rows))
        pad = [width - len(r) for r in rows]
        return {
            "input_ids": torch.tensor([r + [self.pad_id] * p for r, p in zip(rows, pad)]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * p for r, p in zip(rows, pad)]),
            "completion_mask": torch.tensor([m + [0] * p for m, p in zip(masks, pad)]),
        }

    def filler(self, data: PreferenceData) -> Batch:
        """One pair that scores nothing (its answer lengths zeroed: no pair counts)."""
        batch = self._padded([data[0]])
        return batch | {"completion_mask": torch.zeros_like(batch["completion_mask"])}

    def count(self, batch: Batch) -> tuple[int, int]:
        """(pairs with answer tokens, tokens through the model)."""
        if "seen" in batch:
            return int((batch["n"].chunk(2)[0] > 0).sum()), batch["input_ids"].numel()
        pairs = int(batch["completion_mask"].chunk(2)[0].any(dim=1).sum())
        return pairs, int(batch["attention_mask"].sum())

    def loss(self, model: nn.Module, batch: Batch, training: bool) -> Terms:
        logps, n = answer_logps(model.model, batch)
        ref = batch.get("ref_logps")
        if ref is None:
            with torch.no_grad(), model.disable_adapters():
                ref, _ = answer_logps(model.model, batch)
        (p_c, p_r), (ref_c, ref_r), (n_c, n_r) = logps.chunk(2), ref.chunk(2), n.chunk(2)
        scored = n_c > 0  # a filler batch scores nothing
        r_c, r_r = p_c - ref_c, p_r - ref_r
        args = self.options
        total = sum(
            weight
            * pair_loss(
                kind, r_c, r_r, n_c.clamp(min=1), n_r.clamp(min=1), args.beta, args.label_smoothing
            )[scored].sum()
            for kind, weight in self.losses
        )
        reward_c, reward_r = (args.beta * r_c.detach())[scored], (args.beta * r_r.detach())[scored]
        sums = {
            "rewards/chosen": reward_c.sum(),
            "rewards/rejected": reward_r.sum(),
            "rewards/accuracies": (reward_c > reward_r).float().sum(),
            "rewards/margins": (reward_c - reward_r).sum(),
            "logps/chosen": p_c.detach()[scored].sum(),
            "logps/rejected": p_r.detach()[scored].sum(),
        }
        return Terms(total, {k: float(v) for k, v in sums.items()})

    def start(self, model, data, saved: dict[str, torch.Tensor], autocast) -> None:
        """The reference's log-probs of every pair, once: from the resumed checkpoint, or
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
    def _reference_logps(self, model, data: PreferenceData, autocast) -> torch.Tensor:
        """[pairs, 2]: the reference's (chosen, rejected) log-probs of every pair."""
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
        return {"eval_loss": loss / n, "eval_pairs": count} | {
            f"eval_{k}": v / n for k, v in sums.items()
        }

    def run_config(self, train: PreferenceData | None, eval: PreferenceData | None) -> dict:
        return {
            "objective": "dpo",
            "pairs_packed_off": self.pack_off,
            "loss_type": self.options.loss_type,
            "beta": self.options.beta,
            "train_data": train.stats() if train is not None else None,
            "eval_data": eval.stats() if eval is not None else None,
        }


class DPOTrainer(Trainer):
    """TRL's `DPOTrainer` call on lorakit's loop; the reference is the model with its adapters
    switched off (pass a base model and `peft_config`, or a model with fresh adapters)."""

    def __init__(
        self,
        model,
        ref_model: Any = None,
        args: DPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Any = None,
        callbacks: list[Any] | None = None,
        optimizers: Any = (None, None),
        peft_config: Any = None,
        launch: Launch | None = None,
        options: DPOOptions | None = None,
        reference: str | None = None,
    ) -> None:
        """TRL's call, plus lorakit's: `args` a TrainConfig with DPO's `options` beside it (a
        DPOConfig is both), `launch` the run's placement, `reference` "base" (adapters off) or
        "start" (the model as given; default for a model that arrives with its adapters)."""
        args = args or DPOConfig()
        options = options or (args if isinstance(args, DPOOptions) else DPOOptions())
        _refuse(
            ref_model=ref_model,
            data_collator=data_collator,
            compute_metrics=compute_metrics,
            optimizers=optimizers,
        )
        # a model that arrives with its adapters (an SFT adapter to improve on) is its own
        # reference as it is now; fresh adapters (peft_config) have the base as theirs
        from_start = (reference or ("base" if peft_config is not None else "start")) == "start"
        model, tokenizer = trl_call.lora_model_for(model, args, peft_config, processing_class)
        if getattr(args, "disable_dropout", False):
            _disable_dropout(model)
        launch = launch if launch is not None else resolve_launch(args)
        objective = DPOObjective(model, tokenizer, args, options, from_start=from_start)
        self.tokenizer = tokenizer
        super().__init__(model, objective, args, train_dataset, eval_dataset, launch, callbacks)


def _refuse(**given: Any) -> None:
    why = {
        "ref_model": "the reference is the model with its adapters switched off (no second copy "
        "of the base)",
        "data_collator": "lorakit batches preference pairs itself",
        "compute_metrics": "lorakit logs TRL's DPO metrics",
        "optimizers": "lorakit builds AdamW from the config",
    }
    for name, value in given.items():
        if value is not None and value != (None, None):
            raise ConfigError(f"DPOTrainer: {name} is not supported: {why[name]}")


def _disable_dropout(model: nn.Module) -> None:
    """TRL's disable_dropout: every dropout of the model (its own and the adapters') off."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
