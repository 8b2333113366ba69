"""The error text convention: '<cause>: <detail>' with a cause from a small fixed set, and counts by cause."""

import pyarrow as pa

from pipeline import causes
from pipeline.causes import CAUSES, Unusable, cause_of, error_counts, error_text


def test_error_text_is_cause_then_detail():
    assert error_text(Unusable(causes.EMPTY)) == "empty file"
    bomb = Unusable(causes.BOMB, "5000 pixels > limit 4999")
    assert error_text(bomb) == "decompression bomb: 5000 pixels > limit 4999" and bomb.cause == causes.BOMB
    assert error_text(MemoryError()) == "out of memory"
    assert error_text(KeyError("x")) == "unexpected error: KeyError: 'x'"


def test_every_cause_reads_back_from_its_text():
    for cause in CAUSES:
        assert cause_of(str(Unusable(cause, "some detail: with a colon"))) == cause
        assert cause_of(str(Unusable(cause))) == cause
    assert len(set(CAUSES)) == len(CAUSES) and not any(": " in cause for cause in CAUSES)


def test_error_counts_count_error_rows_by_cause():
    errors = pa.chunked_array([["empty file", None, "truncated image: image file is truncated"],
                               ["truncated image: other: detail", None, "not an image (looks like HTML)"]])
    assert error_counts(errors) == {"empty file": 1, "not an image (looks like HTML)": 1, "truncated image": 2}
    assert error_counts(pa.array([None, None], type=pa.string())) == {}
