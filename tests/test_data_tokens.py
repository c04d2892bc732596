"""Data specs on the real testbed tokenizer: chats through a chat template (every assistant turn scored, nothing
else), the documented fallback without one, and malformed JSONL records refused as ``FILE:LINE: problem; fix``."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

import allocopt.testbed
from allocopt.data.tokens import chat_tokens, dataset_rows, load_tokens
from allocopt.errors import AllocoptError

CHAT = [("system", "be brief"), ("user", "what is 37+45?"), ("assistant", "82"), ("user", "and 2+2?"),
        ("assistant", "it is 4")]
# Role headers are special tokens, as in real chat templates; "\n" is written as a literal so that Jinja's
# trim_blocks (transformers turns it on) cannot drop it after a block tag.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ '\n' }}{{ m['content'] }}<|end|>{{ '\n' }}"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{{ '\n' }}{% endif %}")
# The same rendering, with the assistant content and its end marker inside {% generation %}.
GENERATION_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ '\n' }}"
                       "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
                       "{% else %}{{ m['content'] }}<|end|>{% endif %}{{ '\n' }}"
                       "{% endfor %}{% if add_generation_prompt %}<|assistant|>{{ '\n' }}{% endif %}")


@pytest.fixture
def tokenizer():
    tok = transformers.AutoTokenizer.from_pretrained(allocopt.testbed.path())
    assert tok.chat_template is None                  # the shipped tokenizer has none: each test sets its own
    tok.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
    return tok


def _scored_runs(tok, ids: list[int], scored: list[bool]) -> list[str]:
    """The decoded text of each maximal run of scored tokens."""
    runs, current = [], []
    for i, s in zip(ids, scored):
        if s:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs + ([tok.decode(current)] if current else [])


def test_chat_template_scores_every_assistant_turn_and_nothing_else(tokenizer):
    tokenizer.chat_template = TEMPLATE
    ids, scored = chat_tokens(tokenizer, CHAT)
    conversation = [{"role": r, "content": c} for r, c in CHAT]
    assert ids == tokenizer.apply_chat_template(conversation, return_dict=False)      # the template's own tokens
    assert _scored_runs(tokenizer, ids, scored) == ["82<|end|>", "it is 4<|end|>"]
    unscored = tokenizer.decode([i for i, s in zip(ids, scored) if not s])
    assert "<|assistant|>" in unscored and "what is 37+45?" in unscored and "and 2+2?" in unscored


def test_generation_markers_give_the_same_tokens_and_mask(tokenizer):
    tokenizer.chat_template = TEMPLATE
    by_prefix = chat_tokens(tokenizer, CHAT)
    tokenizer.chat_template = GENERATION_TEMPLATE
    assert chat_tokens(tokenizer, CHAT) == by_prefix


def test_without_chat_template_role_lines_are_the_documented_fallback(tokenizer):
    ids, scored = chat_tokens(tokenizer, CHAT)
    assert tokenizer.decode(ids) == "system: be brief\nuser: what is 37+45?\nassistant: 82\nuser: and 2+2?\nassistant: it is 4\n"
    # byte-level BPE merges the space after "assistant:" into " it": a token that carries content is scored
    assert _scored_runs(tokenizer, ids, scored) == ["82", " it is 4"]


def test_chat_jsonl_scores_positions_before_assistant_tokens(tokenizer, tmp_path):
    """Through load_tokens: position t is scored exactly when token t+1 belongs to an assistant turn."""
    tokenizer.chat_template = TEMPLATE
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": r, "content": c} for r, c in CHAT]}) + "\n")
    tokens = load_tokens(str(path), tokenizer, seq_len=64, num_seqs=4)
    ids, scored = chat_tokens(tokenizer, CHAT)
    assert len(tokens) == 1 and tokens.input_ids[0, :len(ids)].tolist() == ids
    assert tokens.score_mask[0, :len(ids) - 1].tolist() == scored[1:] and not tokens.score_mask[0, len(ids) - 1:].any()
    assert tokens.num_scored == sum(scored) == len(tokenizer("82<|end|>it is 4<|end|>")["input_ids"])


def test_long_chat_keeps_later_turns_in_further_windows(tokenizer, tmp_path):
    """A chat longer than one window is not truncated after its first turn: later assistant turns are scored too."""
    turns = [m for i in range(12) for m in (("user", f"what is {i}+{i}?"), ("assistant", f"it is {2 * i}"))]
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n")
    tokens = load_tokens(str(path), tokenizer, seq_len=32, num_seqs=100)
    ids, scored = chat_tokens(tokenizer, turns)
    assert len(tokens) == -(-len(ids) // 32) > 1
    windows_scored = sum(s for start in range(0, len(ids), 32) for s in scored[start + 1:start + 32])
    assert tokens.num_scored == windows_scored and tokens.score_mask[-1].any()


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    tokenizer.chat_template = "{{ messages | length }} turns\n" + TEMPLATE          # the header changes with every turn
    with pytest.raises(AllocoptError, match=r"chat: the tokenizer's chat template renders the turns before message 2 "
                                            r"differently.*\{% generation %\}"):
        chat_tokens(tokenizer, CHAT)


def test_template_error_is_one_line_naming_the_record(tokenizer, tmp_path):
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('system messages are not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    path = tmp_path / "chat.jsonl"
    path.write_text("\n" + json.dumps({"messages": [{"role": r, "content": c} for r, c in CHAT]}) + "\n")
    with pytest.raises(AllocoptError, match=rf"{path}:2: the tokenizer's chat template cannot render this chat "
                                            r"\(system messages are not supported\)"):
        load_tokens(str(path), tokenizer, seq_len=64, num_seqs=4)


MALFORMED = [
    ("null", "the record is null, not a JSON object"),
    ("5", "the record is a number, not a JSON object"),
    ('"just text"', "the record is a string, not a JSON object"),
    ('{"text": null}', '"text" is null, not a string; make "text" a JSON string'),
    ('{"completion": null}', '"completion" is null, not a string'),
    ('{"prompt": "2+2=", "completion": null}', '"completion" is null, not a string'),
    ('{"prompt": "2+2=", "response": 4}', '"response" is a number, not a string'),
    ('{"prompt": "2+2="}', 'has a "prompt" but no "response" or "completion"'),
    ('{"response": "4"}', 'has a "response" but no "prompt"'),
    ('{"text": "a", ', "not valid JSON (Expecting property name enclosed in double quotes at column 15)"),
    ('{"title": "a"}', "has none of the fields text, prompt + response (or completion), or messages"),
    ('{"messages": "hi"}', '"messages" is a string; give a non-empty array'),
    ('{"messages": []}', '"messages" is an empty array'),
    ('{"messages": [{"role": "user", "content": "hi"}, null]}', "messages[1] is null, not an object"),
    ('{"messages": [{"role": "user"}]}', 'messages[0] has no "content"; give every message a string "content"'),
    ('{"messages": [{"role": "user", "content": ["hi"]}]}', 'messages[0] has "content" an array'),
]


@pytest.mark.parametrize("line, problem", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_jsonl_names_file_and_line(tokenizer, tmp_path, line, problem):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(AllocoptError) as err:
        load_tokens(str(path), tokenizer, seq_len=16, num_seqs=2)
    message = str(err.value)
    assert message.startswith(f"{path}:3: {problem}") and "; " in message and "\n" not in message, message


def test_non_utf8_text_names_the_line(tokenizer, tmp_path):
    path = tmp_path / "data.txt"
    path.write_bytes(b"fine\nstill fine\n\xff\xfe broken\n")
    with pytest.raises(AllocoptError, match=rf"{path}:3: not UTF-8 text; save the file as UTF-8"):
        load_tokens(str(path), tokenizer, seq_len=4, num_seqs=2)
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')
    with pytest.raises(AllocoptError, match=rf"{path}:2: not UTF-8 text"):
        load_tokens(str(path), tokenizer, seq_len=4, num_seqs=2)


def test_esap_cli_scores_exactly_the_assistant_tokens_of_a_chat_file(tmp_path):
    """Through the real CLI: a saved tiny model whose tokenizer has a chat template, a two-chat JSONL file; the
    number of scored tokens `allocopt esap` reports is the number of tokens of all assistant messages."""
    from click.testing import CliRunner

    from allocopt.cli.main import cli
    from allocopt.models import describe
    from allocopt.runtime import load_model
    from allocopt.plan import Plan
    from reliability_kit import save_tiny_model

    save_tiny_model(tmp_path / "model")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}{{ '\n' }}{{ m['content'] }}{{ '\n' }}{% endfor %}"
    tok.save_pretrained(tmp_path / "model")
    chats = [[("user", "expert 3 takes"), ("assistant", "token 4 in layer 2"), ("user", "while 1"),
              ("assistant", "others wait")],
             [("system", "layer 0"), ("user", "expert 9"), ("assistant", "takes token 6 while 2 others wait")]]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in chat]}) + "\n"
                                                 for chat in chats))
    model, _ = load_model(tmp_path / "model")
    Plan.identity(describe(model).fingerprint, describe(model).num_experts).save(tmp_path / "plan.json")
    result = CliRunner().invoke(cli, ["esap", "--model", str(tmp_path / "model"), "--plan", str(tmp_path / "plan.json"),
                                      "--data", str(tmp_path / "chat.jsonl"), "--seq-len", "64", "--num-seqs", "4", "--json"])
    assert result.exit_code == 0, result.output
    expected = sum(len(tok(c, add_special_tokens=False)["input_ids"]) for chat in chats for r, c in chat if r == "assistant")
    assert json.loads(result.output.strip().splitlines()[-1])["tokens"] == expected == 14


# ---- dataset directories (datasets' save_to_disk) ---------------------------------------------------------

def test_dataset_rows_keep_calibration_and_search_disjoint():
    sizes = {"math": 5, "code": 3}
    calibration, note = dataset_rows(sizes, "calibration", "D")
    search, _ = dataset_rows(sizes, "search", "D")
    assert calibration == [("math", 0), ("code", 0), ("math", 2), ("code", 2), ("math", 4)]     # interleaved splits
    assert search == [("math", 1), ("code", 1), ("math", 3)]
    assert not set(calibration) & set(search) and len(calibration) + len(search) == sum(sizes.values())
    assert note == ("D has no calibration/search splits, so calibration gets rows 0, 2, 4, ... (5 rows) of 'math' (5 rows), "
                    "'code' (3 rows) and search gets rows 1, 3, 5, ...")
    assert dataset_rows({"": 4}, "search", "D")[0] == [("", 1), ("", 3)]                       # a single Dataset
    rows, note = dataset_rows({"calibration": 2, "search": 3, "train": 9}, "search", "D")
    assert rows == [("search", 0), ("search", 1), ("search", 2)]
    assert note == "D: search data is its split 'search' (3 rows); splits 'train' are not used"
    with pytest.raises(AllocoptError, match="D has a 'calibration' split but no 'search' split; add a 'search' split"):
        dataset_rows({"calibration": 2, "train": 9}, "search", "D")


def test_directory_that_is_no_dataset_is_refused(tokenizer, tmp_path):
    (tmp_path / "notes.txt").write_text("a folder of text files is not a dataset\n")
    with pytest.raises(AllocoptError, match=rf"{tmp_path} is a directory but not a saved Hugging Face dataset"):
        load_tokens(str(tmp_path), tokenizer, seq_len=8, num_seqs=2)


@pytest.fixture
def saved_dataset(tmp_path):
    """A DatasetDict with splits math and code (neither named calibration/search), written by save_to_disk."""
    datasets = pytest.importorskip("datasets", reason='datasets is an optional extra: pip install "allocopt[datasets]"')
    splits = {name: datasets.Dataset.from_dict({"text": [f"{name} document {i}: " + TEXT_LINE * (i + 1) for i in range(n)]})
              for name, n in (("math", 6), ("code", 4))}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "ds"))
    return tmp_path / "ds"


TEXT_LINE = "expert 3 takes token 4 in layer 2 while 1 others wait. "


def test_saved_dataset_splits_are_all_used_and_calibration_and_search_share_no_row(tokenizer, saved_dataset, caplog):
    with caplog.at_level("INFO", logger="allocopt"):
        calibration = load_tokens(str(saved_dataset), tokenizer, seq_len=512, num_seqs=100, split="calibration")
        search = load_tokens(str(saved_dataset), tokenizer, seq_len=512, num_seqs=100, split="search")
    first = [tokenizer.decode(row[mask.bool()]).split(":")[0] for row, mask in zip(calibration.input_ids, calibration.attention_mask)]
    second = [tokenizer.decode(row[mask.bool()]).split(":")[0] for row, mask in zip(search.input_ids, search.attention_mask)]
    assert first == ["math document 0", "code document 0", "math document 2", "code document 2", "math document 4"]
    assert second == ["math document 1", "code document 1", "math document 3", "code document 3", "math document 5"]
    assert [r.getMessage() for r in caplog.records] == [note for split, rows, other, other_rows in (
        ("calibration", "0, 2, 4, ...", "search", "1, 3, 5, ..."), ("search", "1, 3, 5, ...", "calibration", "0, 2, 4, ..."))
        for note in (f"{saved_dataset} has no calibration/search splits, so {split} gets rows {rows} (5 rows) of 'math' "
                     f"(6 rows), 'code' (4 rows) and {other} gets rows {other_rows}",
                     f"{saved_dataset} gives 5 {split} rows of up to 512 tokens, fewer than the 100 asked; all 5 are "
                     "used (more text or a lower row count silences this)")]


def test_data_with_fewer_rows_than_asked_is_used_whole_with_a_note(tokenizer, tmp_path, caplog):
    """A text file of 3 windows asked for 50 rows gives its 3 and says so; asked for 3 (or fewer) it says nothing."""
    path = tmp_path / "short.txt"
    ids = tokenizer("the router picks experts. " * 200, add_special_tokens=False)["input_ids"]
    path.write_text(tokenizer.decode(ids[:3 * 64 + 10]), encoding="utf-8")
    with caplog.at_level("INFO", logger="allocopt"):
        whole = load_tokens(str(path), tokenizer, seq_len=64, num_seqs=50)
        rows = len(whole.input_ids)
        exact = load_tokens(str(path), tokenizer, seq_len=64, num_seqs=rows)
    assert rows >= 2 and len(exact.input_ids) == rows and torch.equal(whole.input_ids, exact.input_ids)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("allocopt")] == [
        f"{path} gives {rows} search rows of up to 64 tokens, fewer than the 50 asked; all {rows} are used (more text "
        "or a lower row count silences this)"]


def test_observe_cli_says_which_rows_calibration_got(saved_dataset, tmp_path):
    from click.testing import CliRunner

    from allocopt.cli.main import cli
    from reliability_kit import save_tiny_model

    save_tiny_model(tmp_path / "model")
    result = CliRunner().invoke(cli, ["observe", "--model", str(tmp_path / "model"), "--data", str(saved_dataset),
                                      "--seq-len", "16", "--num-seqs", "4", "--no-progress", "--out", str(tmp_path / "s.safetensors")])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith(("note:", "warning:", "error:"))]  # no progress bars
    assert notes == [f"note: {saved_dataset} has no calibration/search splits, so calibration gets "
                                          "rows 0, 2, 4, ... (5 rows) of 'math' (6 rows), 'code' (4 rows) and search gets rows 1, 3, 5, ..."]


def test_saved_dataset_with_only_a_calibration_split_is_refused(tokenizer, tmp_path):
    datasets = pytest.importorskip("datasets", reason='datasets is an optional extra: pip install "allocopt[datasets]"')
    datasets.DatasetDict({"calibration": datasets.Dataset.from_dict({"text": ["a b c"]}),
                          "train": datasets.Dataset.from_dict({"text": ["d e f"]})}).save_to_disk(str(tmp_path / "ds"))
    assert load_tokens(str(tmp_path / "ds"), tokenizer, seq_len=8, num_seqs=2, split="calibration").num_tokens > 0
    with pytest.raises(AllocoptError, match=r"has a 'calibration' split but no 'search' split"):
        load_tokens(str(tmp_path / "ds"), tokenizer, seq_len=8, num_seqs=2, split="search")


def test_saved_dataset_without_the_datasets_package_says_what_to_install(tokenizer, tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")          # what save_to_disk writes for a single Dataset
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)    # import datasets now raises ImportError
    with pytest.raises(AllocoptError, match=r"is a saved Hugging Face dataset but the `datasets` package is not installed; "
                                            r'pip install "allocopt\[datasets\]"'):
        load_tokens(str(tmp_path / "ds"), tokenizer, seq_len=8, num_seqs=2)
