"""Corpus sources and the token store, against direct tokenization."""

import json

import pandas as pd
import pytest
import torch

from kvmem.errors import KvmemError
from kvmem.profile.corpus import Corpus
from kvmem.profile.tokens import TokenStore, tokenize


def test_pydoc_default_corpus_is_the_reference_manual():
    docs = list(Corpus("pydoc").documents())
    from pydoc_data.topics import topics

    assert len(docs) == len([t for t in topics.values() if t.strip()]) and sum(map(len, docs)) > 400_000


def test_txt_blocks_folder_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\nsecond doc\n\n\n  \nthird")
    assert list(Corpus(str(tmp_path / "a.txt")).documents()) == ["first doc\nstill first", "second doc", "third"]
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee")
    (folder / "sub" / "a.txt").write_text("ay")
    (folder / "skip.md").write_text("not text")
    assert list(Corpus(str(folder)).documents()) == ["bee", "ay"]  # sorted by path: b.txt < sub/a.txt
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    assert list(Corpus(str(tmp_path / "c.jsonl"), text_field="body").documents()) == ["one", "two"]
    with pytest.raises(KvmemError, match="no 'text' field"):
        list(Corpus(str(tmp_path / "c.jsonl")).documents())
    pd.DataFrame({"text": ["x y", None, "z"]}).to_parquet(tmp_path / "d.parquet")
    assert list(Corpus(str(tmp_path / "d.parquet")).documents()) == ["x y", "z"]


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good text\n\nbad \xff\xfe bytes")
    corpus = Corpus(str(tmp_path / "bad.txt"))
    docs = list(corpus.documents())
    assert docs == ["good text", "bad \ufffd\ufffd bytes"] and corpus.invalid_utf8 == 1


@pytest.mark.parametrize("make, needle", [
    (lambda p: p / "missing.txt", "no such file"),
    (lambda p: (p / "empty.txt").write_text("\n\n  \n") and p / "empty.txt", "holds no text"),
    (lambda p: (p / "x.csv").write_text("a,b") and p / "x.csv", "unknown format"),
    (lambda p: (p / "bad.jsonl").write_text("{not json") and p / "bad.jsonl", "not valid JSON"),
    (lambda p: (p / "emptydir").mkdir() or p / "emptydir", "no .txt files"),
])
def test_bad_corpora(tmp_path, make, needle):
    with pytest.raises(KvmemError, match=needle):
        list(Corpus(str(make(tmp_path))).documents())


def test_hub_corpus_refused_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KvmemError, match="needs the network"):
        list(Corpus("hf:wikitext:wikitext-103-raw-v1:validation").documents())


def test_tokenize_matches_the_tokenizer_and_stops_at_max_tokens(tmp_path, tiny_tokenizer):
    docs = ["alpha beta gamma", "the second document is longer than the first one", "third"]
    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    eos = tiny_tokenizer.eos_token_id
    expected = [tiny_tokenizer(d, add_special_tokens=False)["input_ids"] + [eos] for d in docs]
    store, ran_out = tokenize(Corpus(str(tmp_path / "c.txt")), tiny_tokenizer, None)
    assert store.ids.tolist() == sum(expected, []) and not ran_out
    assert store.doc_offsets.tolist() == [0, *torch.tensor([len(e) for e in expected]).cumsum(0).tolist()]
    cut = len(expected[0]) + 3
    store, ran_out = tokenize(Corpus(str(tmp_path / "c.txt")), tiny_tokenizer, cut)
    assert store.ids.tolist() == sum(expected, [])[:cut] and store.n_docs == 2 and not ran_out
    store, ran_out = tokenize(Corpus(str(tmp_path / "c.txt")), tiny_tokenizer, 10_000)
    assert ran_out and store.n_tokens == sum(map(len, expected))


def test_store_docs_context_shards_and_concat(tmp_path):
    ids = torch.arange(20, dtype=torch.int32)
    store = TokenStore(ids, torch.tensor([0, 3, 11, 20]))
    assert store.doc_of(torch.tensor([0, 2, 3, 10, 11, 19])).tolist() == [0, 0, 1, 1, 2, 2]
    ctx, at = store.context(12, before=5, after=2)
    assert ctx == [11, 12, 13, 14] and at == 1  # stops at the document start
    # rows of 4: shard rows [0, 2) and [2, 5); the second starts inside document 1
    a, b = store.slice_rows(0, 2, 4), store.slice_rows(2, 5, 4)
    assert a.ids.tolist() == list(range(8)) and a.doc_offsets.tolist() == [0, 3, 8] and not a.continues_doc
    assert b.ids.tolist() == list(range(8, 20)) and b.doc_offsets.tolist() == [0, 3, 12] and b.continues_doc
    whole = a.concat(b)
    assert torch.equal(whole.ids, store.ids) and torch.equal(whole.doc_offsets, store.doc_offsets)
    store.save(tmp_path / "t.safetensors")
    back = TokenStore.load(tmp_path / "t.safetensors")
    assert torch.equal(back.ids, store.ids) and torch.equal(back.doc_offsets, store.doc_offsets)
    b.save(tmp_path / "b.safetensors")
    assert TokenStore.load(tmp_path / "b.safetensors").continues_doc
