import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from featureatlas.ingest.corpus import BUILTIN, Document, read_source
from featureatlas.store.errors import BadConfig


def test_user_files_of_every_format(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "json line", "title": "T"}) + "\n\n")
    pq.write_table(pa.table({"text": ["parquet row", ""]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.csv").write_text("x,y")
    docs = read_source(str(tmp_path))
    assert sorted(d.text for d in docs) == ["json line", "parquet row", "plain text file"]
    assert len({d.doc_id for d in docs}) == 3
    assert {d.title for d in docs} >= {"T", "a"}


def test_order_and_split_are_deterministic(corpus_dir):
    a, b = read_source(str(corpus_dir)), read_source(str(corpus_dir))
    assert [d.doc_id for d in a] == [d.doc_id for d in b]
    held = [d.is_eval(0.2) for d in a]
    assert 0 < sum(held) < len(held)
    # The split depends on the id alone, not on the text or order.
    d = a[0]
    assert Document(d.doc_id, "x", "y", "z").is_eval(0.2) == d.is_eval(0.2)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.txt", "no such file"),
        (lambda p: (p / "e").mkdir() or p / "e", "holds no"),
        (lambda p: (p / "x.jsonl").write_text('{"title": 1}\n') and p / "x.jsonl", "no string 'text'"),
        (lambda p: (p / "x.jsonl").write_text("not json\n") and p / "x.jsonl", "not JSON"),
        (lambda p: (p / "x.txt").write_text("   ") and p / "x.txt", "no non-empty"),
    ],
)
def test_bad_sources_fail_clearly(tmp_path, make, message):
    with pytest.raises(BadConfig, match=message):
        read_source(str(make(tmp_path)))


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_sources_read_real_text(name):
    docs = read_source(name)
    assert len(docs) > 100
    assert all(d.text.strip() and d.title for d in docs[:50])
    sample = " ".join(d.text for d in docs[:200])
    expect = {"wiki-en": " the ", "wiki-fr": " le ", "wiki-es": " el ", "shakespeare": "SCENE", "python": "def "}[name]
    assert expect in sample
