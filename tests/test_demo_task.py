"""The demo's date task: determinism, disjoint splits, answer validity, exact-match semantics.

No model is loaded here except in the one generation test, which uses the tiny random Llama.
"""

from __future__ import annotations

import datetime as dt
import re

import pytest

from lorakit.demo import task
from lorakit.demo.task import (DEMO_DEFAULTS, INSTRUCTION, STYLES, make_examples, make_task,
                               reference)
from lorakit.inference.generate import exact_match

MONTH = {m.lower(): i + 1 for i, m in enumerate(task.MONTHS)}
MONTH.update({m.lower(): i + 1 for i, m in enumerate(task.MONTHS_ABBR)})


def _yy(s: str) -> int:
    y = int(s)
    return 2000 + y if y < task.YY_PIVOT else 1900 + y


# An independent reader for every style, so a renderer that swaps day and month (or gets the
# two-digit-year pivot wrong) fails here instead of teaching the model a wrong answer.
PARSERS = {
    "month_d_yyyy": (r"([A-Z][a-z]+) (\d{1,2}), (\d{4})", lambda m, d, y: (int(y), MONTH[m.lower()], int(d))),
    "d_month_yyyy": (r"(\d{1,2}) ([A-Z][a-z]+) (\d{4})", lambda d, m, y: (int(y), MONTH[m.lower()], int(d))),
    "ord_of_month_yy": (r"(\d{1,2})(?:st|nd|rd|th) of ([A-Z][a-z]+) '(\d{2})",
                        lambda d, m, y: (_yy(y), MONTH[m.lower()], int(d))),
    "mon_ord_yyyy": (r"([A-Z][a-z]{2}) (\d{1,2})(?:st|nd|rd|th), (\d{4})",
                     lambda m, d, y: (int(y), MONTH[m.lower()], int(d))),
    "us_slash": (r"(\d{2})/(\d{2})/(\d{4}) \(US\)", lambda m, d, y: (int(y), int(m), int(d))),
    "eu_slash": (r"(\d{2})/(\d{2})/(\d{4}) \(EU\)", lambda d, m, y: (int(y), int(m), int(d))),
    "dot_dmy": (r"(\d{1,2})\.(\d{1,2})\.(\d{4})", lambda d, m, y: (int(y), int(m), int(d))),
    "d_mon_yy": (r"(\d{1,2})-([A-Z][a-z]{2})-(\d{2})", lambda d, m, y: (_yy(y), MONTH[m.lower()], int(d))),
    "compact": (r"(\d{4})(\d{2})(\d{2})", lambda y, m, d: (int(y), int(m), int(d))),
    "month_yyyy_ord": (r"([a-z]+) (\d{1,2})(?:st|nd|rd|th) (\d{4})",
                       lambda m, d, y: (int(y), MONTH[m], int(d))),
}


def _parse(style: str, text: str) -> dt.date:
    pattern, fields = PARSERS[style]
    m = re.fullmatch(pattern, text)
    assert m, f"{style}: {text!r} does not match {pattern}"
    return dt.date(*fields(*m.groups()))


def test_every_style_has_an_independent_parser():
    assert set(PARSERS) == set(STYLES)


def test_same_seed_same_rows_other_seed_other_rows():
    a = make_task(200, 50, seed=3)
    assert a == make_task(200, 50, seed=3)
    assert a != make_task(200, 50, seed=4)


def test_eval_rows_do_not_depend_on_n_train():
    # the demo may train on more or fewer rows; the held-out set must stay the same
    assert make_task(10, 40, seed=1)[1] == make_task(500, 40, seed=1)[1]


def test_train_and_eval_are_disjoint_by_date():
    train, held = make_examples(3000, 500, seed=0)
    train_dates = {e.date for e in train}
    assert len(train_dates) == len(train)  # each date at most once
    assert len({e.date for e in held}) == len(held)
    assert train_dates.isdisjoint(e.date for e in held)
    # and so no held-out prompt text appears in training either
    assert {e.text for e in train}.isdisjoint(e.text for e in held)


def test_every_completion_is_the_iso_form_of_the_date_the_prompt_shows():
    train, held = make_examples(4000, 1000, seed=7)
    rows_train, rows_eval = make_task(4000, 1000, seed=7)
    for ex, row in zip(train + held, rows_train + rows_eval):
        answer = reference(row)
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", answer)
        assert dt.date.fromisoformat(answer) == ex.date
        assert row["prompt"][-1]["content"] == ex.text
        assert _parse(ex.style, ex.text) == ex.date
        assert task.FIRST_DATE <= ex.date <= task.LAST_DATE


def test_all_styles_are_used_and_edge_dates_render():
    _, held = make_examples(0, 2000, seed=0)
    assert {e.style for e in held} == set(STYLES)
    for d in (dt.date(1950, 1, 1), dt.date(1999, 12, 31), dt.date(2000, 2, 29),
              dt.date(2049, 12, 31), dt.date(2011, 11, 11), dt.date(2023, 1, 22)):
        for style, render in STYLES.items():
            assert _parse(style, render(d)) == d, (style, render(d))


def test_row_shape_is_conversational_prompt_completion():
    (row,), _ = make_task(1, 0, seed=0)
    assert set(row) == {"prompt", "completion"}
    assert row["prompt"][0] == {"role": "system", "content": INSTRUCTION}
    assert row["prompt"][1]["role"] == "user"
    assert [m["role"] for m in row["completion"]] == ["assistant"]


def test_ordinals():
    assert [task.ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 30, 31)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "30th", "31st"]


def test_bad_sizes_and_styles_are_refused():
    with pytest.raises(ValueError):
        make_task(-1, 5)
    with pytest.raises(ValueError):
        make_task(len(task.all_dates()), 1)
    with pytest.raises(ValueError):
        make_task(5, 5, styles=["nope"])


def test_styles_can_be_restricted():
    train, held = make_examples(100, 100, seed=0, styles=["us_slash"])
    assert {e.style for e in train + held} == {"us_slash"}


def test_exact_match_strips_whitespace_and_nothing_else():
    assert exact_match("2021-03-05", "2021-03-05")
    assert exact_match("  2021-03-05\n", "2021-03-05")
    assert exact_match("2021-03-05", " 2021-03-05 ")
    assert not exact_match("2021-3-5", "2021-03-05")
    assert not exact_match("2021-03-05.", "2021-03-05")
    assert not exact_match("The date is 2021-03-05", "2021-03-05")
    assert not exact_match("2021-03-05 2021-03-05", "2021-03-05")
    assert not exact_match("2021/03/05", "2021-03-05")
    assert not exact_match("", "2021-03-05")


def test_demo_defaults_are_complete():
    assert set(DEMO_DEFAULTS) >= {"n_train", "n_eval", "max_steps", "lr", "batch_size",
                                  "max_length", "r", "alpha", "max_new_tokens"}
    # one pass over the training rows, and room for the answer plus the end-of-turn token
    assert DEMO_DEFAULTS["n_train"] >= DEMO_DEFAULTS["max_steps"] * DEMO_DEFAULTS["batch_size"]
    assert DEMO_DEFAULTS["max_new_tokens"] >= len("2021-03-05") + 1


def test_demo_package_does_not_import_peft_or_trl():
    # read the sources rather than importing them in a fresh interpreter: as strict, and fast
    import ast
    from pathlib import Path

    for path in Path(task.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("peft", "trl") for n in names), (path, names)


@pytest.mark.default_model
def test_generated_predictions_batched_equal_one_by_one(smol_tokenizer):
    """Left padding must not change greedy outputs; order is kept; end-of-turn stops decoding."""
    import torch

    from conftest import make_tiny_llama
    from lorakit.inference.generate import generate_texts

    tok = smol_tokenizer
    model = make_tiny_llama(vocab_size=len(tok), seed=0)
    _, rows = make_task(0, 3, seed=0)
    prompts = [r["prompt"] for r in rows] + ["a plain string prompt"]
    batched = generate_texts(model, tok, prompts, max_new_tokens=5, batch_size=3)
    single = [generate_texts(model, tok, [p], max_new_tokens=5, batch_size=1)[0]
              for p in prompts]
    assert batched == single
    assert len(batched) == len(prompts) and all(isinstance(s, str) for s in batched)

    # a model that always says <|im_end|> gives empty completions
    im_end = tok.convert_tokens_to_ids("<|im_end|>")

    class SaysImEnd(torch.nn.Module):
        def forward(self, h):
            out = torch.zeros(*h.shape[:-1], len(tok))
            out[..., im_end] = 1.0
            return out

    model.lm_head = SaysImEnd()
    assert generate_texts(model, tok, prompts[:2], max_new_tokens=4) == ["", ""]
    assert generate_texts(model, tok, []) == []


def test_the_demo_run_config_builds(tmp_path):
    """The demo builds its RunConfig in code: a section added to RunConfig must not break it
    (a required `dpo` section once did, and nothing but `lorakit demo` noticed)."""
    from lorakit.demo.run import _run_config

    cfg = _run_config(tmp_path, max_steps=4, seed=0)
    assert cfg.training.max_steps == 4 and "dpo:" in cfg.to_yaml()


def test_the_dpo_demo_rows_carry_the_habit_and_the_pairs_undo_it(tmp_path):
    """`lorakit demo --objective dpo`: the habit's sentence only on HABIT_STYLES' SFT rows; the
    pairs, on other dates than the SFT and held-out rows, prefer the bare date to it."""
    import json

    from lorakit.demo import preference
    from lorakit.demo.run import _write_task

    examples, pairs = _write_task(tmp_path, 20, seed=0, dpo=True)
    rows = [json.loads(x) for x in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    habit = [r for r in rows if r["completion"][0]["content"].startswith("The date is ")]
    assert len(rows) == DEMO_DEFAULTS["n_train"] and 0 < len(habit) < len(rows) // 2
    d = preference.DPO_DEFAULTS
    assert len(pairs) == d["max_steps"] * d["batch_size"]
    for p in pairs:
        answer = p["chosen"][0]["content"]
        assert p["rejected"][0]["content"] == f"The date is {answer}."
    seen = {r["prompt"][-1]["content"] for r in rows} | {e.prompt[-1]["content"] for e in examples}
    assert not seen & {p["prompt"][-1]["content"] for p in pairs}
