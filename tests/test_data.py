"""The SFT data pipeline: sources, formats and their loss masks, truncation, batching, packing."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_tiny_llama

from lorakit.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    ChatTemplateError,
    DataError,
    SFTData,
    LengthGroupedBatches,
    collate,
    detect_format,
    load_records,
    pack,
    prepare_dataset,
)
from lorakit.base.capabilities import check_packing_supported, packing_supported

IGNORE = -100

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tiny models gain nothing from threads, and on a busy 2-core machine intra-op threads
    # spin-wait: a 4x16-token forward took 0.4 s with 2 threads, 4 ms with 1.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trained_text(tok, example) -> str:
    return tok.decode([t for t in example["labels"] if t != IGNORE])


# ----------------------------------------------------------------------------------------- sources

ROWS = [{"prompt": "Q: capital of France?\nA:", "completion": " Paris"},
        {"prompt": "Q: day of launch?\nA:", "completion": "2006-02-01"}]


def test_json_sources_read_back_exactly(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(ROWS, indent=2))
    write_jsonl(tmp_path / "lines.json", ROWS)
    write_jsonl(tmp_path / "rows.jsonl", ROWS)
    (tmp_path / "blank_lines.jsonl").write_text("\n" + json.dumps(ROWS[0]) + "\n\n"
                                                + json.dumps(ROWS[1]) + "\r\n")
    for name in ("list.json", "lines.json", "rows.jsonl", "blank_lines.jsonl"):
        assert load_records(tmp_path / name) == ROWS, name
    assert load_records(ROWS) == ROWS


def test_date_like_strings_stay_strings(tmp_path):
    # pyarrow's JSON reader (behind datasets' "json" loader) infers timestamps from such values
    rows = [{"text": "2006-02-01"}, {"text": "2024-01-01T10:00:00"}, {"text": "12"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for path in (write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "d.json"):
        got = load_records(path)
        assert got == rows and all(type(r["text"]) is str for r in got)
    # what datasets' "json" loader hands over for such a column is refused, naming the row
    import datetime

    import datasets

    stamped = datasets.Dataset.from_list([{"text": datetime.datetime(2006, 2, 1)}])
    with pytest.raises(DataError, match=r"<Dataset> row 1: field 'text' must be a string, got dat"):
        load_records(stamped)
    with open(tmp_path / "d.csv", "w", newline="") as f:
        csv.writer(f).writerows([["text"], ["2006-02-01"], ["007"], ["1e3"]])
    assert [r["text"] for r in load_records(tmp_path / "d.csv")] == ["2006-02-01", "007", "1e3"]


def test_csv_parquet_save_to_disk_and_dataset_sources(tmp_path):
    import datasets

    rows = [{"instruction": "Say hi", "input": "", "output": "hi,\n\"friend\""},
            {"instruction": "Add", "input": "2 + 2", "output": "4"}]
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(rows)
    assert load_records(tmp_path / "a.csv") == rows  # quoted newline and quotes survive

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    assert load_records(tmp_path / "a.parquet") == rows

    ds = datasets.Dataset.from_list(rows)
    assert load_records(ds) == rows
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_records(tmp_path / "saved") == rows
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert load_records(tmp_path / "dd") == rows


def test_detect_format_and_override():
    assert detect_format({"text": "x"}) == "text"
    assert detect_format(["messages", "text"]) == "messages"
    assert detect_format({"prompt": "a", "completion": "b", "text": "c"}) == "prompt_completion"
    assert detect_format({"instruction": "a", "output": "b"}) == "alpaca"
    with pytest.raises(DataError, match="cannot tell the data format"):
        detect_format({"question": "a"})
    rows = [{"prompt": "a", "completion": "b", "text": "c"}]
    assert load_records(rows, format="text") == rows
    with pytest.raises(DataError, match="missing field 'text'"):
        load_records([{"prompt": "a", "completion": "b"}], format="text")


GOOD_CHAT = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}


@pytest.mark.parametrize("name, content, where, problem", [
    ("bad.jsonl", '{"text": "a"}\n\n{"text": "b"\n', "line 3", "malformed JSON"),
    ("bad.jsonl", '{"text": "a"}\n{"txt": "b"}\n', "line 2", "missing field 'text'"),
    ("bad.jsonl", '{"text": "a"}\n{"text": 5}\n', "line 2", "field 'text' must be a string, got int"),
    ("bad.jsonl", json.dumps(GOOD_CHAT) + '\n{"messages": "hi"}\n', "line 2",
     "must be a list of {role, content} dicts, got str"),
    ("bad.jsonl", '{"messages": [["user", "hi"]]}\n', "line 1", "item 0 is list"),
    ("bad.jsonl", '{"messages": [{"role": "user", "text": "hi"}]}\n', "line 1",
     "message 0 has no 'content'"),
    ("bad.jsonl", '{"messages": [{"role": "user", "content": null}]}\n', "line 1",
     "'content' must be a string, got null"),
    ("bad.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1",
     "no assistant message"),
    ("bad.jsonl", '{"prompt": "hi", "completion": [{"role": "assistant", "content": "x"}]}\n',
     "line 1", "must both be strings or both lists"),
    ("bad.jsonl", '[1, 2]\n', "line 1", "expected an object"),
    ("bad.json", '[\n  {"text": "a"},\n  {"text": "b",}\n]\n', "line 3", "malformed JSON"),
    ("bad.json", '[\n  {"text": "a"},\n\n  {"text": ["b"]}\n]', "line 4", "must be a string"),
    ("bad.json", '[{"text": "a"}] x', "line 1", "extra data"),
    ("bad.json", '{\n  "text": "a"\n}\n', "line 1", "one JSON object per line"),
    ("bad.csv", 'text,extra\na,b\n"c\nd",e,f\n', "line 3", "3 fields, but the header has 2"),
    ("bad.csv", 'question\nwhat\n', "bad.csv:", "cannot tell the data format"),
    ("empty.jsonl", "", "empty.jsonl:", "empty"),
    ("empty.jsonl", "\n\n", "empty.jsonl:", "empty"),
    ("empty.json", "[]", "empty.json:", "empty"),
    ("empty.csv", "", "empty.csv:", "empty"),
    ("empty.csv", "text\n", "empty.csv:", "empty"),
    ("bad.txt", "hello", "bad.txt:", "unsupported file type"),
])
def test_bad_files_name_file_line_and_problem(tmp_path, name, content, where, problem):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_records(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and where in msg and problem in msg, msg


def test_bad_rows_in_parquet_lists_and_missing_paths(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": None}]), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x\.parquet row 2: field 'text' must be a string, got null"):
        load_records(tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"<list> row 3: missing field 'completion'"):
        load_records([{"prompt": "a", "completion": "b"}] * 2 + [{"prompt": "c"}])
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        load_records(tmp_path / "plain_dir")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="junk.parquet: not a readable Parquet file"):
        load_records(tmp_path / "junk.parquet")
    with pytest.raises(DataError, match="empty"):
        load_records([])


# --------------------------------------------------------------------- formats and loss masks

@pytest.mark.default_model
def test_text_trains_on_everything_plus_eos(smol_tokenizer):
    tok = smol_tokenizer
    data = prepare_dataset([{"text": "The sky is blue."}, {"text": "Done.<|im_end|>"}], tok, 64)
    ex = data[0]
    assert tok.decode(ex["input_ids"]) == "The sky is blue.<|im_end|>"
    # every token is trained except the first, which nothing predicts
    assert ex["labels"] == [IGNORE] + ex["input_ids"][1:]
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(data[1]["input_ids"]) == "Done.<|im_end|>"  # no second EOS
    assert data.format == "text" and data.stats.label_tokens == sum(len(e["input_ids"]) - 1
                                                                     for e in data.examples)


@pytest.mark.default_model
def test_prompt_completion_strings_train_on_completion_and_eos(smol_tokenizer):
    tok = smol_tokenizer
    data = prepare_dataset(ROWS, tok, 64)
    for row, ex in zip(ROWS, data.examples):
        assert tok.decode(ex["input_ids"]) == row["prompt"] + row["completion"] + "<|im_end|>"
        assert trained_text(tok, ex) == row["completion"] + "<|im_end|>"
        # the trained tokens are one contiguous tail
        first = next(i for i, t in enumerate(ex["labels"]) if t != IGNORE)
        assert ex["labels"][first:] == ex["input_ids"][first:]


@pytest.mark.default_model
def test_alpaca_trains_on_output_only(smol_tokenizer):
    tok = smol_tokenizer
    rows = [{"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
            {"instruction": "Name a colour.", "input": "", "output": "Blue"},
            {"instruction": "Name a fruit.", "output": "Apple"}]
    data = prepare_dataset(rows, tok, 128)
    assert data.format == "alpaca"
    prompts = [ALPACA_PROMPT.format(instruction="Add the numbers.", input="2 and 2"),
               ALPACA_PROMPT_NO_INPUT.format(instruction="Name a colour."),
               ALPACA_PROMPT_NO_INPUT.format(instruction="Name a fruit.")]
    assert prompts[0].endswith("### Input:\n2 and 2\n\n### Response:\n")
    for row, prompt, ex in zip(rows, prompts, data.examples):
        assert tok.decode(ex["input_ids"]) == prompt + row["output"] + "<|im_end|>"
        assert trained_text(tok, ex) == row["output"] + "<|im_end|>"


@pytest.mark.default_model
def test_chat_trains_on_assistant_turns_and_end_of_turn(smol_tokenizer):
    tok = smol_tokenizer
    data = prepare_dataset([{"messages": CHAT}], tok, 256)
    ex = data[0]
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(CHAT, tokenize=False)
    assert trained_text(tok, ex) == "Hello! How can I help?<|im_end|>4<|im_end|>"
    # two separate trained runs, each ending on <|im_end|>, nothing of system/user turns
    runs, cur = [], []
    for t in ex["labels"] + [IGNORE]:
        if t != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    assert runs == ["Hello! How can I help?<|im_end|>", "4<|im_end|>"]


def _with_generation_tags(template: str) -> str:
    """SmolLM2's ChatML template with {% generation %} around assistant content + <|im_end|>."""
    turn = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    assert turn in template
    tagged = ("{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}"
              "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
              "{{'\n'}}{% else %}" + turn + "{% endif %}")
    return template.replace(turn, tagged)


@pytest.mark.default_model
def test_chat_mask_matches_transformers_generation_tags(smol_tokenizer):
    """Our template-derived mask equals transformers' own mask from a generation-tagged copy."""
    tok = smol_tokenizer
    tagged = _with_generation_tags(tok.chat_template)
    convs = [CHAT, CHAT[1:], CHAT[1:3],
             [{"role": "user", "content": "Say  spaced\n\nlines "},
              {"role": "assistant", "content": " leading space and trailing\n"},
              {"role": "user", "content": "émoji 🙂?"}, {"role": "assistant", "content": "🙂🙂"}]]
    data = prepare_dataset([{"messages": c} for c in convs], tok, 512)
    for conv, ex in zip(convs, data.examples):
        ref = tok.apply_chat_template(conv, chat_template=tagged, return_dict=True,
                                      return_assistant_tokens_mask=True)
        assert ex["input_ids"] == ref["input_ids"]
        want = [t if m else IGNORE for t, m in zip(ref["input_ids"], ref["assistant_masks"])]
        assert ex["labels"] == want


# A template without {% generation %} tags and without a generation prompt: the role header
# sits inside the diff between renderings and must be skipped.
PLAIN_TEMPLATE = ("{% for m in messages %}{{ '### ' + m['role'] + ':\n' + m['content'] + eos_token"
                  " + '\n\n' }}{% endfor %}")
# Zephyr-style, with a generation prompt.
ZEPHYR_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token"
                   " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
                   "{% endif %}")


@pytest.mark.default_model
@pytest.mark.parametrize("template", [PLAIN_TEMPLATE, ZEPHYR_TEMPLATE])
def test_chat_template_string_without_generation_tags(smol_tokenizer, template):
    tok = smol_tokenizer
    data = prepare_dataset([{"messages": CHAT}], tok, 256, chat_template=template)
    ex = data[0]
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(CHAT, chat_template=template,
                                                                 tokenize=False)
    assert trained_text(tok, ex) == "Hello! How can I help?<|im_end|>4<|im_end|>"
    # an assistant-first conversation (transformers cannot render the empty prefix)
    first = [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "ok"}]
    ex = prepare_dataset([{"messages": first}], tok, 64, chat_template=template)[0]
    assert trained_text(tok, ex) == "I start.<|im_end|>"
    # contents that also occur in the role header or in the end-of-turn token
    tricky = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "end"},
              {"role": "user", "content": "b"}, {"role": "assistant", "content": "assistant"}]
    ex = prepare_dataset([{"messages": tricky}], tok, 64, chat_template=template)[0]
    assert trained_text(tok, ex) == "end<|im_end|>assistant<|im_end|>"


@pytest.mark.default_model
def test_template_breaking_prefix_property_is_refused(smol_tokenizer):
    # writes the number of messages up front, so a prefix renders differently
    counting = ("{{ messages|length }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + "
                "eos_token }}{% endfor %}")
    rows = [{"messages": CHAT[1:3]}, {"messages": CHAT}]
    with pytest.raises(ChatTemplateError, match=r"<list> row 1: .*not prefix-stable"):
        prepare_dataset(rows, smol_tokenizer, 256, chat_template=counting)


@pytest.mark.default_model
def test_template_refusing_a_conversation_names_the_row(smol_tokenizer):
    strict = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('roles must start with "
              "user') }}{% endif %}{% for m in messages %}{{ m['content'] + eos_token }}"
              "{% endfor %}")
    rows = [{"messages": CHAT[1:3]}, {"messages": CHAT}]
    with pytest.raises(ChatTemplateError, match=r"<list> row 2: .*roles must start with user"):
        prepare_dataset(rows, smol_tokenizer, 256, chat_template=strict)


@pytest.mark.default_model
def test_conversational_prompt_completion_trains_on_completion_only(smol_tokenizer):
    tok = smol_tokenizer
    prompt = [{"role": "user", "content": "Capital of Italy?"},
              {"role": "assistant", "content": "Rome."},  # few-shot: part of the prompt
              {"role": "user", "content": "Capital of Spain?"}]
    completion = [{"role": "assistant", "content": "Madrid."}]
    ex = prepare_dataset([{"prompt": prompt, "completion": completion}], tok, 256)[0]
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(prompt + completion,
                                                                 tokenize=False)
    assert trained_text(tok, ex) == "Madrid.<|im_end|>"


def _bos_word_tokenizer():
    """A tiny word-level fast tokenizer that adds BOS, like Llama's (built offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in "Q : what is the capital of France ? A Paris".split():
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def test_tokenizer_added_bos_is_kept_and_never_trained():
    tok = _bos_word_tokenizer()
    rows = [{"prompt": "Q: what is the capital of France?\nA:", "completion": " Paris"},
            {"text": "the capital"}]
    ex = prepare_dataset(rows[:1], tok, 32)[0]
    assert tok.convert_ids_to_tokens(ex["input_ids"]) == [
        "<s>", "Q", ":", "what", "is", "the", "capital", "of", "France", "?", "A", ":", "Paris",
        "</s>"]
    assert tok.convert_ids_to_tokens([t for t in ex["labels"] if t != IGNORE]) == ["Paris", "</s>"]
    ex = prepare_dataset(rows[1:], tok, 32)[0]
    assert tok.convert_ids_to_tokens(ex["input_ids"]) == ["<s>", "the", "capital", "</s>"]
    assert ex["labels"] == [IGNORE] + ex["input_ids"][1:]


# ------------------------------------------------------------------------- truncation and drops

@pytest.mark.default_model
def test_truncation_keeps_the_beginning_and_drops_rows_without_labels(smol_tokenizer):
    tok = smol_tokenizer
    long_prompt = "word " * 40
    rows = [{"prompt": "Short?", "completion": " yes"},
            {"prompt": long_prompt, "completion": " answer"},  # completion cut off: dropped
            {"prompt": "word " * 10, "completion": " a b c d e f g h"}]  # cut, kept
    full = [len(tok(r["prompt"] + r["completion"])["input_ids"]) + 1 for r in rows]
    max_length = 16
    assert full[0] <= max_length < full[2] and len(tok(long_prompt)["input_ids"]) > max_length
    data = prepare_dataset(rows, tok, max_length)
    s = data.stats
    assert (s.rows, s.examples, s.truncated, s.dropped) == (3, 2, 2, 1)
    assert [len(e["input_ids"]) for e in data.examples] == [full[0], max_length]
    assert s.tokens == full[0] + max_length
    assert s.label_tokens == sum(t != IGNORE for e in data.examples for t in e["labels"])
    cut = data[1]
    whole = tok(rows[2]["prompt"] + rows[2]["completion"])["input_ids"]
    assert cut["input_ids"] == whole[:max_length]  # right truncation: the start survives
    assert tok.eos_token_id not in cut["labels"]


# ------------------------------------------------------------------------------------ collate

def test_collate_pads_right_and_masks_by_length_not_token_id():
    eos = pad = 2  # SmolLM2: the pad token is the EOS token
    examples = [{"input_ids": [5, 6, 7, eos], "labels": [IGNORE, IGNORE, 7, eos]},
                {"input_ids": [8, eos], "labels": [IGNORE, eos]}]
    b = collate(examples, pad_token_id=pad)
    assert b["input_ids"].tolist() == [[5, 6, 7, eos], [8, eos, pad, pad]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, IGNORE, 7, eos], [IGNORE, eos, IGNORE, IGNORE]]
    assert all(t.dtype == torch.long for t in b.values())
    assert collate(examples, pad, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)
    with pytest.raises(ValueError, match="pad_token_id"):
        collate(examples, None)


def test_padded_batch_matches_single_examples():
    model = make_tiny_llama()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (9, 4, 6)]
    b = collate([{"input_ids": s, "labels": s} for s in seqs], pad_token_id=0)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        for i, s in enumerate(seqs):
            alone = model(input_ids=torch.tensor([s])).logits[0]
            torch.testing.assert_close(logits[i, : len(s)], alone, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------ sampler

def test_length_grouped_batches_deterministic_grouped_and_resumable():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 1000, (1037,), generator=g).tolist()
    s = LengthGroupedBatches(lengths, batch_size=8, seed=3, mega_batches=10)
    b0 = s.batches(0)
    assert len(b0) == len(s) == 130
    assert sorted(i for b in b0 for i in b) == list(range(1037))  # each index once
    assert b0 == LengthGroupedBatches(lengths, 8, seed=3, mega_batches=10).batches(0)
    assert b0 != s.batches(1) and b0 != LengthGroupedBatches(lengths, 8, 4, mega_batches=10).batches(0)
    # grouped: a batch spans far less length range than a random batch of 8 would (~780)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in b0) / len(b0)
    assert spread < 150
    assert [len(b) for b in b0].count(8) == 129  # one short batch, somewhere after the shuffle

    s.set_epoch(1)
    assert list(s) == s.batches(1)
    # resume: a fresh sampler continues exactly where an interrupted run stopped
    seen = []
    for k, batch in enumerate(s.iter_from(1)):
        if k == 17:
            break
        seen.append(batch)
    resumed = list(LengthGroupedBatches(lengths, 8, seed=3, mega_batches=10).iter_from(1, 17))
    assert seen + resumed == s.batches(1)

    d = LengthGroupedBatches(lengths, 8, seed=3, drop_last=True)
    assert len(d) == len(d.batches(0)) == 129 and all(len(b) == 8 for b in d.batches(0))
    plain = LengthGroupedBatches(lengths, 8, shuffle=False)
    assert plain.batches(0) == plain.batches(5)
    first = plain.batches(0)[:50]  # the first mega-chunk: data order, sorted longest first
    assert sorted(i for b in first for i in b) == list(range(400))

    loader = torch.utils.data.DataLoader(list(range(1037)), batch_sampler=s)
    assert [x.tolist() for x in loader] == s.batches(1)


# ------------------------------------------------------------------------------------ packing

def _random_examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] + ids[1:]})
    return out


def test_pack_fills_rows_and_restarts_positions():
    examples = _random_examples([7, 3, 12, 5, 9, 1, 4, 8])
    rows = pack(examples, max_length=16)
    assert all(len(r["input_ids"]) <= 16 for r in rows)
    assert len(rows) == 4  # 49 tokens: 4 rows of 16 is the minimum
    # every example appears exactly once, whole, at a position-id restart
    pieces = []
    for r in rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0] + [len(r["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            assert r["position_ids"][a:b] == list(range(b - a))
            assert r["labels"][a] == IGNORE
            pieces.append(r["input_ids"][a:b])
    assert sorted(pieces) == sorted(e["input_ids"] for e in examples)
    assert pack(SFTData(examples), max_length=16) == rows  # deterministic, takes SFTData too
    with pytest.raises(ValueError, match="more than max_length"):
        pack(examples, max_length=10)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_rows_are_isolated_like_single_examples(impl):
    model = make_tiny_llama(attn_implementation=impl)
    model.config.use_cache = False  # as training should; see the use_cache test below
    assert packing_supported(model)
    examples = _random_examples([6, 9, 4, 11, 3, 7], seed=1)
    rows = pack(examples, max_length=16)
    batch = collate(rows, pad_token_id=0)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == len(rows) > 1
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        seen = 0
        for r, row in enumerate(rows):
            pos = row["position_ids"] + [0]
            starts = [i for i, p in enumerate(pos) if p == 0]
            for a, b in zip(starts, starts[1:]):
                alone = model(input_ids=torch.tensor([row["input_ids"][a:b]])).logits[0]
                torch.testing.assert_close(logits[r, a:b], alone, atol=1e-5, rtol=1e-4)
                seen += 1
        assert seen == len(examples)
        # the loss of the packed batch is the token-weighted loss of the single examples
        packed_loss = model(**batch).loss
        total = n = 0
        for e in examples:
            k = sum(t != IGNORE for t in e["labels"])
            total += model(input_ids=torch.tensor([e["input_ids"]]),
                           labels=torch.tensor([e["labels"]])).loss * k
            n += k
        torch.testing.assert_close(packed_loss, total / n, atol=1e-5, rtol=1e-5)


def test_packing_leaks_with_a_kv_cache_or_an_attention_mask():
    """Why packing_supported insists on use_cache=False, and collate returns no attention_mask."""
    model = make_tiny_llama(attn_implementation="sdpa")
    examples = _random_examples([5, 6], seed=2)
    batch = collate(pack(examples, 16), pad_token_id=0)
    assert batch["position_ids"].tolist() == [list(range(5)) + list(range(6))]
    second = slice(5, 11)  # within a row, examples keep their data order
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([examples[1]["input_ids"]])).logits[0]
        leaky = model(**batch, use_cache=True).logits[0, second]
        masked = model(**batch, attention_mask=torch.ones_like(batch["input_ids"]),
                       use_cache=False).logits[0, second]
        isolated = model(**batch, use_cache=False).logits[0, second]
    assert not torch.allclose(leaky, alone, atol=1e-3)
    assert not torch.allclose(masked, alone, atol=1e-3)
    torch.testing.assert_close(isolated, alone, atol=1e-5, rtol=1e-4)
    assert model.config.use_cache and not packing_supported(model)
    with pytest.raises(ValueError, match="use_cache"):
        check_packing_supported(model)


def test_packing_supported_by_attention_implementation():
    model = make_tiny_llama(attn_implementation="eager")
    model.config.use_cache = False
    assert packing_supported(model)
    wrapper = torch.nn.Sequential(model)  # an adapter wrapper still exposes the HF model
    assert packing_supported(wrapper)
    model.config._attn_implementation = "flash_attention_2"
    assert not packing_supported(model) and packing_supported(model, batch_size=1)
    with pytest.raises(ValueError, match="batch of one row"):
        check_packing_supported(model, batch_size=4)
    model.config._attn_implementation = "paged|sdpa"
    assert not packing_supported(model)
    with pytest.raises(ValueError, match="not a transformers model"):
        check_packing_supported(torch.nn.Linear(2, 2))
