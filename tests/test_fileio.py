"""read_tagged_json: the one reader of logitparity's tagged JSON files; one
test per message (each names the file kind, the path, expected and found,
and ends with the caller's fix)."""

from __future__ import annotations

import json
import os

import pytest

from logitparity._fileio import FORMAT_NAMES, LEGACY_INT_VERSIONS, LEGACY_TAGS, read_tagged_json

FIX = "write it again"


def _read(p, reads="1.0", **kw):
    return read_tagged_json(p, fmt="logitparity-x", what="x file", fix=FIX, reads=reads, **kw)


def _file(tmp_path, content):
    p = tmp_path / "f.json"
    p.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return p


def test_reads_a_tagged_object(tmp_path):
    doc = {"format": "logitparity-x", "version": "1.3", "a": [1, 2]}
    assert _read(_file(tmp_path, doc)) == doc  # a newer minor is read
    assert _read(_file(tmp_path, {**doc, "version": "2.4"}), reads=("1.0", "2.0"))["a"] == [1, 2]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^x file .*nope.json does not exist; write it again$"):
        _read(tmp_path / "nope.json")


def test_directory(tmp_path):
    os.mkdir(tmp_path / "d.json")
    with pytest.raises(ValueError, match=r"^x file .*d.json is a directory, expected a JSON file; write it again$"):
        _read(tmp_path / "d.json")


def test_not_utf8(tmp_path):
    with pytest.raises(ValueError, match=r"f.json is not UTF-8 text \(byte 0xff at offset 13\); write it again$"):
        _read(_file(tmp_path, b'{"format": "x\xff"}'))


def test_not_json(tmp_path):
    with pytest.raises(ValueError, match=r"f.json is not valid JSON \(Expecting .*\); write it again$"):
        _read(_file(tmp_path, b"{"))
    with pytest.raises(ValueError, match=r"f.json is not valid JSON \(Exceeds the limit"):
        _read(_file(tmp_path, b'{"n": ' + b"1" * 5000 + b"}"))


def test_not_an_object(tmp_path):
    with pytest.raises(ValueError, match=r"expected format 'logitparity-x', found a JSON list, not an object; write"):
        _read(_file(tmp_path, [1]))


def test_wrong_format_names_the_kind_it_is(tmp_path):
    with pytest.raises(ValueError, match=r"f.json: expected format 'logitparity-x', found format 'other'; write it"):
        _read(_file(tmp_path, {"format": "other"}))
    with pytest.raises(ValueError, match=r"found format 'logitparity-ppl-baseline', which is a baseline-cache manifest"):
        _read(_file(tmp_path, {"format": "logitparity-ppl-baseline"}))


def test_accepted_other_format_is_returned_for_the_caller(tmp_path):
    doc = {"format": "logitparity-noise-floor", "layers": {}}
    assert _read(_file(tmp_path, doc), accept=("logitparity-noise-floor",)) == doc
    # a legacy spelling is accepted too, and comes back respelled
    legacy = {"format": "logitparity.noise-floor", "version": 2, "layers": {}}
    assert _read(_file(tmp_path, legacy), accept=("logitparity-noise-floor",)) == {**doc, "version": "2.0"}


@pytest.mark.parametrize("version, match", [
    (None, r"'version' must look like '1.0', got None; write it again"),
    ("1", r"'version' must look like '1.0', got '1'"),
    ("2.0", r"version 2.0 is newer than this logitparity reads \(1.0\); upgrade logitparity \(pip install -U"),
    ("0.9", r"version 0.9 is older than this logitparity reads \(1.0\); write it again"),
])
def test_major_minor_versions(tmp_path, version, match):
    with pytest.raises(ValueError, match=match):
        _read(_file(tmp_path, {"format": "logitparity-x", "version": version}))


@pytest.mark.parametrize("version, match", [
    ("4.0", r"version 4.0 is newer than this logitparity reads \(1.0, 3.0\); upgrade logitparity"),
    ("2.1", r"version 2.1 is older than this logitparity reads \(1.0, 3.0\); write it again"),
    (3, r"'version' must look like '1.0', got 3; write"),  # this kind never wrote integers
    (True, r"'version' must look like '1.0', got True; write"),
])
def test_several_majors(tmp_path, version, match):
    assert _read(_file(tmp_path, {"format": "logitparity-x", "version": "3.2"}), reads=("1.0", "3.0"))
    with pytest.raises(ValueError, match=match):
        _read(_file(tmp_path, {"format": "logitparity-x", "version": version}), reads=("1.0", "3.0"))


# ---------------------------------------------------------------- legacy spellings (_fileio.LEGACY_TAGS)


@pytest.mark.parametrize("old, new", sorted(LEGACY_TAGS.items()))
def test_a_legacy_tag_and_integer_version_still_load(tmp_path, old, new):
    """Files written before every tag was logitparity-<kind> and every version
    "M.m" (written here by hand as the old writers did) still load, respelled."""
    assert new.startswith("logitparity-") and new in FORMAT_NAMES and old not in FORMAT_NAMES
    p = _file(tmp_path, {"format": old, "version": 1, "a": 1})
    doc = read_tagged_json(p, fmt=new, what="x file", fix=FIX, reads="1.0")
    assert doc == {"format": new, "version": "1.0", "a": 1}
    # today's spelling reads the same
    assert read_tagged_json(_file(tmp_path, doc), fmt=new, what="x file", fix=FIX, reads="1.0") == doc


def test_integer_versions_are_legacy_only_for_the_kinds_that_wrote_them(tmp_path):
    assert "logitparity-ppl-baseline" in LEGACY_INT_VERSIONS
    doc = read_tagged_json(_file(tmp_path, {"format": "logitparity-ppl-baseline", "version": 1}),
                           fmt="logitparity-ppl-baseline", what="x file", fix=FIX, reads="1.0")
    assert doc["version"] == "1.0"
    assert "logitparity-dump" not in LEGACY_INT_VERSIONS  # a dump's version was always a string
    with pytest.raises(ValueError, match=r"'version' must look like '1.0', got 1; write it again"):
        read_tagged_json(_file(tmp_path, {"format": "logitparity-dump", "version": 1}),
                         fmt="logitparity-dump", what="x file", fix=FIX, reads="1.0")


def test_a_legacy_version_too_new_is_named_as_the_file_spells_it(tmp_path):
    with pytest.raises(ValueError, match=r"f.json: version 9 is newer than this logitparity reads \(1.0, 2.0\); "
                                         r"upgrade logitparity"):
        read_tagged_json(_file(tmp_path, {"format": "logitparity.noise-floor", "version": 9}),
                         fmt="logitparity-noise-floor", what="x file", fix=FIX, reads=("1.0", "2.0"))


def test_a_legacy_tag_of_another_kind_is_named_as_the_file_spells_it(tmp_path):
    with pytest.raises(ValueError, match=r"expected format 'logitparity-x', found format 'logitparity.comparison', "
                                         r"which is a comparison report"):
        _read(_file(tmp_path, {"format": "logitparity.comparison", "version": 1}))


def test_unknown_tag_keeps_its_message(tmp_path):
    with pytest.raises(ValueError, match=r"^x file .*f.json: expected format 'logitparity-x', found format "
                                         r"'logitparity.other'; write it again$"):
        _read(_file(tmp_path, {"format": "logitparity.other", "version": 1}))
