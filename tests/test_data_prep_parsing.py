"""The vectorized text parsing against plain Python on tricky values (integers, hex, lines)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from data_prep.textparse import (
    AVAZU,
    CRITEO,
    MALFORMED_KINDS,
    MISSING_KEY,
    hex_keys,
    parse_chunk,
    string_keys,
)


def _row(label: str, dense: list[str], cats: list[str]) -> str:
    return "\t".join([label, *dense, *cats])


def _py_int(text: str) -> int | None:
    """Reference: the integer a dense field holds (None = malformed), before the transform."""
    if text == "":
        return 0
    body = text[1:] if text[0] in "+-" else text
    if not body or len(body) > 18 or any(ch not in "0123456789" for ch in body):
        return None
    return 0 if text[0] == "-" else int(body)


def test_dense_integers_match_python():
    rng = np.random.default_rng(0)
    values = ["", "0", "7", "-1", "+12", "-", "+", "12a", "1.5", " 3", "99999999", "123456789",
              "999999999999999999", "1234567890123456789", "00000042", "-00000000042", "1e3", "٣"]
    values += [str(int(v)) for v in rng.integers(0, 10**12, 40)] + [str(-int(v)) for v in rng.integers(0, 10**9, 10)]
    cats = ["0a0b0c0d"] * 26
    lines, want = [], []
    for k, v in enumerate(values):
        dense = ["5"] * 13
        dense[k % 13] = v
        lines.append(_row("1", dense, cats))
        want.append(_py_int(v))
    data = ("\n".join(lines) + "\n").encode()
    p = parse_chunk(data, 1, CRITEO)
    bad = {int(line) for line, kind in zip(p.bad_lines, p.bad_kinds) if MALFORMED_KINDS[kind] == "non_integer_dense"}
    assert bad == {i + 1 for i, w in enumerate(want) if w is None}
    good = [i for i, w in enumerate(want) if w is not None]
    assert p.lines.tolist() == [i + 1 for i in good]
    for row, i in enumerate(good):
        expected = np.float32(np.log1p(np.float64(want[i])))
        assert p.dense[row, i % 13] == expected, (values[i], p.dense[row, i % 13])
    assert np.isfinite(p.dense).all()


def test_hex_categories_match_python():
    rng = np.random.default_rng(1)
    cells = ["", "0", "ff", "FF", "0A0B0C0D", "0a0b0c0d", "ffffffff", "00000000", "123456789", "0123456789abcdef",
             "0123456789abcdef0", "xyz", "12 34", "gggggggg", "0a0b0c0g", "-1"]
    cells += [f"{v:08x}" for v in rng.integers(0, 2**32, 30)]
    lines = []
    for k, c in enumerate(cells):
        cat = ["0a0b0c0d"] * 26
        cat[k % 26] = c
        lines.append(_row("0", ["1"] * 13, cat))
    p = parse_chunk(("\n".join(lines) + "\n").encode(), 1, CRITEO)

    def ref(c: str):
        if c == "":
            return MISSING_KEY
        if len(c) > 16 or any(ch not in "0123456789abcdefABCDEF" for ch in c):
            return None
        return np.int64(np.uint64(int(c, 16)).view(np.int64)) if int(c, 16) >= 2**63 else int(c, 16)

    want = [ref(c) for c in cells]
    bad = {int(x) for x in p.bad_lines}
    assert bad == {i + 1 for i, w in enumerate(want) if w is None}
    good = [i for i, w in enumerate(want) if w is not None]
    for row, i in enumerate(good):
        assert p.keys[row, i % 26] == want[i], cells[i]
    keys, bad_cells = hex_keys(pa.array(cells))
    assert [None if b else int(k) for k, b in zip(keys, bad_cells)] == [None if w is None else int(w) for w in want]


def test_line_level_problems_and_last_line_without_newline():
    good = _row("1", ["1"] * 13, ["0a0b0c0d"] * 26)
    data = "\n".join([good, "", good[:20] + "\r" + good[20:], good + "\tx", good[:-9], "\t" + good[2:], good]).encode()
    p = parse_chunk(data, 10, CRITEO)
    assert p.lines.tolist() == [10, 16]
    kinds = dict(zip(p.bad_lines.tolist(), [MALFORMED_KINDS[k] for k in p.bad_kinds]))
    assert kinds == {11: "blank_line", 12: "crlf", 13: "field_count", 14: "field_count", 15: "empty_label"}


def test_avazu_strings_and_hours():
    header_free = [
        "1,0,14102100,1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,ddd2926e,44956a24,1,2,15706,320,50,1722,0,35,-1,79",
        "2,1,14102913,1005,0,,f3845767,28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,ddd2926e,44956a24,1,2,15706,320,50,1722,0,35,-1,79",
        "3,1,14103099,1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,ddd2926e,44956a24,1,2,15706,320,50,1722,0,35,-1,79",
        "4,,14102100,1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,ddd2926e,44956a24,1,2,15706,320,50,1722,0,35,-1,79",
    ]
    p = parse_chunk(("\n".join(header_free) + "\n").encode(), 2, AVAZU)
    assert p.lines.tolist() == [2, 3]
    assert dict(zip(p.bad_lines.tolist(), [MALFORMED_KINDS[k] for k in p.bad_kinds])) == {4: "bad_hour", 5: "empty_label"}
    # 2014-10-21 was a Tuesday (weekday 1), 2014-10-29 a Wednesday; hours 0 and 13.
    assert p.keys[:, 0].tolist() == [0, 13] and p.keys[:, 1].tolist() == [1, 2]
    assert p.keys[1, 5 - 3 + 2] == MISSING_KEY  # empty site_id
    k = string_keys(pa.array(["a", "b", "a", "", None, "-1"]))
    assert k[0] == k[2] != k[1] and k[3] == k[4] == MISSING_KEY and k[5] >= 0


def test_strict_names_file_and_line():
    from data_prep import MalformedRowError

    good = _row("1", ["1"] * 13, ["0a0b0c0d"] * 26)
    with pytest.raises(MalformedRowError, match=r"f\.txt:8: malformed row \(non_integer_dense\)"):
        parse_chunk((good + "\n" + good.replace("\t1\t", "\tone\t", 1) + "\n").encode(), 7, CRITEO,
                    file="f.txt", strict=True)


def test_criteo_fast_path_matches_exact_parser(monkeypatch):
    """Well-formed chunks go through pyarrow.csv; the result equals the exact numpy parser's."""
    import data_prep.textparse as tp

    rng = np.random.default_rng(2)
    dense_cells = ["", "0", "-1", "+12", "-00000000042", "123456789", "999999999999999999", "00000042", "7"]
    lines = []
    for i in range(300):
        dense = [dense_cells[int(j)] for j in rng.integers(0, len(dense_cells), 13)]
        cats = [f"{int(v):08x}" if v % 7 else "" for v in rng.integers(0, 2**32, 26)]
        cats[3] = f"{int(rng.integers(0, 5)):08x}"  # few distinct values, repeated
        cats[4] = ""  # a column with no value at all
        lines.append(_row(str(i % 2), dense, cats))
    data = ("\n".join(lines)).encode()  # the last line without a newline
    fast_path = tp._criteo_fast
    assert fast_path(data, 3) is not None
    assert fast_path(data, 3, n_lines=299) is None  # a line count that differs from pyarrow's: in doubt
    fast = parse_chunk(data, 3, CRITEO, n_lines=300)
    assert fast.encoded is not None  # the fast path hands over dictionary-encoded columns
    monkeypatch.setattr(tp, "_criteo_fast", lambda *args, **kwargs: None)
    exact = parse_chunk(data, 3, CRITEO)
    for name in ("labels", "dense", "keys", "lines", "bad_lines", "bad_kinds"):
        a, b = getattr(fast, name), getattr(exact, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert len(fast.labels) == 300 and (fast.keys == MISSING_KEY).any()
    for (fi, fu), (ei, eu) in zip(fast.columns(), exact.columns()):  # same partition, distinct keys
        assert len(np.unique(fu)) == len(fu) and sorted(fu.tolist()) == sorted(eu.tolist())
        assert np.array_equal(fu[fi], eu[ei])
    assert fast.columns()[4][1].tolist() == [MISSING_KEY] and len(fast.columns()[3][1]) <= 5
    # anything unusual sends the chunk to the exact parser: upper case, a blank line, a CR, a bad field
    good = _row("1", ["1"] * 13, ["0a0b0c0d"] * 26)
    assert fast_path(f"{good}\n{good}\n".encode(), 1) is not None
    for bad in [good.replace("0a0b0c0d", "0A0B0C0D", 1), "", good + "\r", good + "\tx",
                good.replace("\t", "\t1.5", 1), good.replace("\t", "\t1234567890123456789", 1)]:
        assert fast_path(f"{good}\n{bad}\n{good}\n".encode(), 1) is None, repr(bad[:20])


def test_chunk_given_as_array_parses_like_its_bytes():
    """A mapped file range (uint8 array) gives the bytes' result: read in place, or copied when it must be
    normalised (CR, decimals); the strict error names the same line."""
    from data_prep import MalformedRowError

    good = _row("1", ["1"] * 13, ["0a0b0c0d"] * 26)
    other = _row("0", ["", "-3", "260"] + ["4"] * 10, [""] + ["ffffffff"] * 25)
    chunks = [f"{good}\n{other}\n{good}\n", f"{good}\r\n{other}\r\n", f"{good}\n{other.replace('260', '260.0')}\n",
              f"{good}\n\n{good}\tx\n{other}", f"{good}\r\r\n{other}\n", f"{good[:30]}\r{good[30:]}\n{good}\r",
              f"{good}\n{good.replace('0a0b0c0d', 'zz', 1)}\n"]
    for text in chunks:
        data = text.encode()
        n_lines = data.count(b"\n") + (not data.endswith(b"\n"))
        a = parse_chunk(np.frombuffer(data, np.uint8), 5, CRITEO, n_lines=n_lines)
        b = parse_chunk(data, 5, CRITEO, n_lines=n_lines)
        for name in ("labels", "dense", "keys", "lines", "bad_lines", "bad_kinds"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), (name, text[:30])
    data = chunks[-1].encode()
    with pytest.raises(MalformedRowError, match=r"f\.txt:6: malformed row \(non_hex_category\)"):
        parse_chunk(np.frombuffer(data, np.uint8), 5, CRITEO, file="f.txt", strict=True, n_lines=2)


def test_vocabulary_lookup_sorted_or_not_matches_a_dict(monkeypatch):
    """``lookup_ids`` (keys sorted first when there are many) gives the ids a plain dict gives, 0 for OOV."""
    import data_prep.vocab as vocab

    rng = np.random.default_rng(1)
    keys = np.unique(rng.integers(-5, 5000, 3000))
    v = vocab.build_vocab(keys, rng.integers(1, 9, len(keys)), min_count=3)
    want = dict(zip(v["sorted_keys"].tolist(), v["sorted_ids"].tolist()))
    query = rng.integers(-10, 6000, 5000)
    expected = [want.get(k, 0) for k in query.tolist()]
    assert len(query) > vocab._SORT_KEYS_ABOVE and 0 < sum(e > 0 for e in expected) < len(query)
    assert vocab.lookup_ids(v, query).tolist() == expected
    monkeypatch.setattr(vocab, "_SORT_KEYS_ABOVE", 10**9)
    assert vocab.lookup_ids(v, query).tolist() == expected
