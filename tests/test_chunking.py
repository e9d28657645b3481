import pytest
from pathlib import Path

from indexing.chunking import chunk_document
from indexing.documents import Document, SourceError, read_source

MD = """# Scaling

Intro words here.

## Adding GPU replicas

Raise max_replicas of the generator deployment.

```bash
# not a heading inside a fence
ray status
```

### Fractional GPUs

Give the reranker num_gpus 0.25.
"""


def doc(text=MD, markdown=True, id="scaling.md"):
    return Document(id=id, text=text, title="Scaling", source="docs/scaling.md", domain="docs", markdown=markdown)


def test_markdown_sections_keep_their_heading_path():
    chunks = chunk_document(doc(), size=50, overlap=10)
    paths = [c.heading_path for c in chunks]
    assert paths == ["Scaling", "Scaling > Adding GPU replicas", "Scaling > Adding GPU replicas > Fractional GPUs"]
    assert "# not a heading inside a fence" in chunks[1].text
    assert [c.id for c in chunks] == ["scaling.md#0", "scaling.md#1", "scaling.md#2"]
    assert all(c.domain == "docs" and c.source == "docs/scaling.md" for c in chunks)


def test_windows_overlap_and_cover_every_word():
    words = [f"w{i}" for i in range(25)]
    chunks = chunk_document(doc(" ".join(words), markdown=False), size=10, overlap=3)
    got = [c.text.split() for c in chunks]
    assert got[0] == words[0:10] and got[1][:3] == words[7:10]
    assert set(sum(got, [])) == set(words)


def test_checksum_is_stable_and_content_sensitive():
    a = chunk_document(doc(), size=50, overlap=10)
    b = chunk_document(doc(), size=50, overlap=10)
    c = chunk_document(doc(MD.replace("0.25", "0.5")), size=50, overlap=10)
    assert [x.checksum for x in a] == [x.checksum for x in b]
    assert [x.checksum for x in a][:2] == [x.checksum for x in c][:2]
    assert a[2].checksum != c[2].checksum


@pytest.mark.parametrize("size, overlap, msg", [(0, 0, "chunk size must be > 0"), (10, 10, "overlap must be in")])
def test_bad_chunk_settings(size, overlap, msg):
    with pytest.raises(ValueError, match=msg):
        chunk_document(doc(), size=size, overlap=overlap)


def test_folder_layout_gives_domains(tmp_path):
    (tmp_path / "wine").mkdir()
    (tmp_path / "wine" / "reds.md").write_text("# Reds\nPinot noir.")
    (tmp_path / "top.txt").write_text("plain text")
    docs = {d.id: d for d in read_source(tmp_path)}
    assert docs["wine/reds.md"].domain == "wine" and docs["wine/reds.md"].title == "Reds"
    assert docs["top.txt"].domain == tmp_path.name and not docs["top.txt"].markdown


def test_jsonl_and_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "c.jsonl").write_text('{"_id": "1", "title": "T", "text": "x", "metadata": {"domain": "club"}}\n')
    pq.write_table(pa.table({"id": ["p1"], "text": ["y"], "updated_at": ["2025-01-01T00:00:00+00:00"]}), tmp_path / "p.parquet")
    docs = {d.id: d for d in read_source(tmp_path)}
    assert docs["1"].domain == "club" and docs["1"].title == "T"
    assert docs["p1"].updated_at.startswith("2025-01-01")


def test_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"_id": "1", "text": "ok"}\n{broken\n')
    with pytest.raises(SourceError, match=r"c.jsonl:2: not valid JSON"):
        list(read_source(tmp_path / "c.jsonl"))


def test_row_without_text_is_named(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"_id": "7", "body": "no text key"}\n')
    with pytest.raises(SourceError, match=r"c.jsonl:1: row '7' has no 'text' string"):
        list(read_source(tmp_path / "c.jsonl"))


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        list(read_source(tmp_path / "nope"))
    (tmp_path / "x.bin").write_bytes(b"\0")
    with pytest.raises(SourceError, match="holds no readable file"):
        list(read_source(tmp_path))


# ---------------------------------------------------------------- issue 16 row 14: links leaving the source


def test_links_leaving_the_source_are_skipped_and_named(tmp_path):
    src, secret_dir = tmp_path / "src", tmp_path / "private"
    (src / "wine").mkdir(parents=True)
    secret_dir.mkdir()
    (secret_dir / "passwords.md").write_text("# Secrets\nroot:hunter2")
    (secret_dir / "notes.txt").write_text("private notes")
    (src / "wine" / "reds.md").write_text("# Reds\nPinot noir.")
    (src / "wine" / "leak.md").symlink_to(secret_dir / "passwords.md")  # a file outside
    (src / "home").symlink_to(secret_dir, target_is_directory=True)  # a folder outside
    (src / "hop.md").symlink_to(src / "wine" / "leak.md")  # a link to a link that leaves
    (src / "same.md").symlink_to(src / "wine" / "reds.md")  # stays inside: read
    (src / "loop.md").symlink_to(src / "loop.md")
    skipped: list[str] = []
    docs = {d.id: d for d in read_source(src, skipped=skipped)}
    assert sorted(docs) == ["same.md", "wine/reds.md"]
    assert all("hunter2" not in d.text and "private notes" not in d.text for d in docs.values())
    assert sorted(s.split(" -> ")[0] for s in skipped) == ["home", "hop.md", "loop.md", "wine/leak.md"]
    assert f"wine/leak.md -> {secret_dir / 'passwords.md'}" in skipped


def test_a_source_of_only_outside_links_says_so(tmp_path):
    src, outside = tmp_path / "src", tmp_path / "elsewhere.md"
    src.mkdir()
    outside.write_text("x")
    (src / "a.md").symlink_to(outside)
    with pytest.raises(SourceError, match=r"holds no readable file.*links leading outside it are not followed: \['a.md -> "):
        list(read_source(src))


def test_a_beir_corpus_link_leaving_the_folder_is_not_read(tmp_path):
    src, outside = tmp_path / "beir", tmp_path / "corpus.jsonl"
    src.mkdir()
    outside.write_text('{"_id": "1", "text": "outside"}\n')
    (src / "corpus.jsonl").symlink_to(outside)
    (src / "inside.md").write_text("inside")
    skipped: list[str] = []
    assert [d.id for d in read_source(src, skipped=skipped)] == ["inside.md"]
    assert [s.split(" -> ")[0] for s in skipped] == ["corpus.jsonl"]


def test_the_build_report_lists_skipped_links():
    from indexing.store import BuildReport

    r = BuildReport(outside_links=["wine/leak.md -> /etc/passwd"])
    assert "1 links leading outside the source skipped (not indexed): wine/leak.md -> /etc/passwd" in r.summary()
    assert "outside" not in BuildReport().summary()


def test_a_source_inside_a_hidden_folder_is_read_but_hidden_files_in_it_are_not(tmp_path):
    from indexing.documents import read_source

    source = tmp_path / ".cache" / "docs"
    (source / ".git").mkdir(parents=True)
    (source / "guide.md").write_text("# Guide\n\nThe tasting room opens at ten.")
    (source / ".git" / "notes.md").write_text("# Secret\n\nnot for the index")
    (source / ".draft.md").write_text("# Draft\n\nnot for the index either")
    names = sorted(Path(d.source).name for d in read_source(source))
    assert names == ["guide.md"], names


# ---------------------------------------------------------------- headings in linear time, a line-length cap

_HEADING_SPEC = r"^(#{1,6})\s+(.+?)\s*#*\s*$"  # what a heading was; its backtracking is cubic in spaces


def test_headings_are_read_as_the_regex_read_them():
    """Every line of up to 8 characters from '#', space, tab and a letter (87 381 lines), and a few
    with other Unicode whitespace, gives the heading level and title the regex gave, or no heading."""
    import itertools
    import re

    from indexing.chunking import _heading

    spec = re.compile(_HEADING_SPEC)

    def by_regex(line):
        m = spec.match(line)
        return (len(m.group(1)), m.group(2)) if m else None

    lines = ["".join(t) for n in range(9) for t in itertools.product("# a\t", repeat=n)]
    lines += ["#\u00a0x\u3000#\u2003", "####### x", "#\x1cx", "# x #\x1f", "# \u00a0", "#" * 6 + " " + "#" * 10,
              "## Adding GPU replicas ##", "### Fractional  GPUs   "]
    assert [by_regex(line) for line in lines] == [_heading(line) for line in lines]


def test_a_heading_of_100000_spaces_is_read_in_under_a_second():
    """The regex took 1.5 s for 1000 spaces and hours for 10 000; run in a child process so that the
    old code fails on the timeout instead of hanging the suite. Both ways: as a markdown document
    (the line is over the length cap: body text) and with the cap lifted (a heading, read linearly)."""
    import json
    import subprocess
    import sys

    code = """
import json, time
import indexing.chunking as ch
from indexing.documents import Document
line = "# a" + " " * 100_000 + "b"
doc = Document(id="x.md", text=line + "\\n\\nbody words", title="x", source="x.md", domain="d", markdown=True)
t = time.perf_counter()
chunks = ch.chunk_document(doc, size=50, overlap=10)
capped = time.perf_counter() - t
ch.MAX_HEADING_LINE = 10**9
t = time.perf_counter()
lifted = ch.chunk_document(doc, size=50, overlap=10)
print(json.dumps({"capped": capped, "lifted": time.perf_counter() - t,
                  "capped_paths": [c.heading_path for c in chunks], "capped_text": chunks[0].text,
                  "lifted_paths": [c.heading_path for c in lifted]}))
"""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("chunking a markdown document whose heading holds 100 000 spaces took over 20 s")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["capped"] < 1 and got["lifted"] < 1, got
    assert got["capped_paths"] == [""] and got["capped_text"] == "# a b body words"  # the long line is body text
    assert got["lifted_paths"] == ["a" + " " * 100_000 + "b"]


def test_a_heading_line_over_the_cap_is_body_text():
    from indexing.chunking import MAX_HEADING_LINE

    title = "t" * (MAX_HEADING_LINE - 2)
    ok = chunk_document(doc(f"# {title}\n\nshort body"), size=50, overlap=10)
    long = chunk_document(doc(f"# {title}x\n\nshort body"), size=50, overlap=10)
    assert [c.heading_path for c in ok] == [title] and ok[0].text == "short body"
    assert [c.heading_path for c in long] == [""] and long[0].text == f"# {title}x short body"


def test_a_huge_title_is_cut_so_the_text_to_embed_stays_linear():
    """A 500 000-character first heading used to ride along in each of the document's 625 chunks
    (313 M characters to embed for a 0.5 MB file); now it is body text and the title is cut."""
    from indexing.formats import read_upload

    data = ("# " + "word " * 100_000 + "\n\nbody").encode()
    (d,) = read_upload("t.md", data, domain="d")
    chunks = chunk_document(d, size=200, overlap=40)
    assert {len(c.title) for c in chunks} == {300} and {c.heading_path for c in chunks} == {""}
    assert sum(len(c.embed_text) for c in chunks) < 2 * len(data)
