"""Serving trained adapters: batched generation (and exact match) over a base model with adapters.

Owns: turning prompts into completions with a (LoRA) model. May import compat, base, lora, data
and training; imported by demo and cli only.
"""
