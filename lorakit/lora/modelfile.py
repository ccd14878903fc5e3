"""An Ollama Modelfile beside an exported GGUF: FROM, ADAPTER, TEMPLATE and stop parameters.

Ollama's templates are Go templates, not Jinja. The TEMPLATE here is derived by rendering the
model's own chat template around placeholder texts and putting Ollama's one-turn variables
(`.System`, `.Prompt`, `.Response`) where the placeholders came out, so it holds exactly the
markers the model was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorakit.atomic import atomic_write_bytes

_SYSTEM, _PROMPT, _RESPONSE = "LORAKITSYSTEM7F3A", "LORAKITPROMPT7F3A", "LORAKITRESPONSE7F3A"


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def _go_literal(text: str) -> str:
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(tokenizer: Any) -> tuple[str, str] | None:
    """(Go template, end-of-turn text) for one chat turn, or None where the chat template does
    not render the placeholders back verbatim (Ollama then reads the GGUF's own template)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    user = {"role": "user", "content": _PROMPT}
    try:
        plain = _render(tokenizer, [user], True)
        system = _render(tokenizer, [{"role": "system", "content": _SYSTEM}, user], True)
        answered = _render(tokenizer, [user, {"role": "assistant", "content": _RESPONSE}], False)
    except Exception:  # a template that refuses a system role or raises on its own checks
        return None
    if plain.count(_PROMPT) != 1 or system.count(_SYSTEM) != 1 or _RESPONSE not in answered:
        return None
    end = answered.split(_RESPONSE, 1)[1]

    def go(text: str) -> str:
        text = _go_literal(text)
        return text.replace(_SYSTEM, "{{ .System }}").replace(_PROMPT, "{{ .Prompt }}")

    template = (
        f"{{{{ if .System }}}}{go(system)}{{{{ else }}}}{go(plain)}{{{{ end }}}}"
        f"{{{{ .Response }}}}{_go_literal(end)}"
    )
    return template, end


def stop_texts(tokenizer: Any, end_of_turn: str = "") -> list[str]:
    """Texts that end an answer: the special token that closes a turn and the EOS token."""
    stops = []
    specials = set(tokenizer.all_special_tokens)
    for token in [end_of_turn.strip(), tokenizer.eos_token]:
        if token and token in specials and token not in stops:
            stops.append(token)
    return stops


def modelfile_text(tokenizer: Any, base: str, adapter: str | None = None) -> str:
    """The Modelfile: FROM `base`, ADAPTER `adapter` (paths as Ollama should read them)."""
    lines = [f"FROM {base}"]
    if adapter is not None:
        lines.append(f"ADAPTER {adapter}")
    derived = ollama_template(tokenizer)
    end = ""
    if derived is None:
        lines.append("# no TEMPLATE: Ollama reads the chat template stored in the GGUF file")
    else:
        template, end = derived
        lines.append(f'TEMPLATE """{template}"""')
    for stop in stop_texts(tokenizer, end):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, tokenizer: Any, base: str, adapter: str | None = None) -> Path:
    """`<stem>.Modelfile` beside `gguf_path`, written atomically; returns its path."""
    path = gguf_path.with_name(gguf_path.stem + ".Modelfile")
    atomic_write_bytes(path, modelfile_text(tokenizer, base, adapter).encode())
    return path
