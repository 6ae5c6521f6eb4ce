"""safe_text: whatever comes in, what goes out encodes to UTF-8, holds no control characters and fits."""

from __future__ import annotations

import pytest

from reled_hpc.text import is_safe, safe_text


@pytest.mark.parametrize(
    "raw",
    [
        "plain",
        "a\ud800b",
        "\udfff" * 10,
        "nul\x00in",
        "\x1b[2J\x1b[31mred",
        "bell\x07",
        "c1\x85\x9b",
        b"\xff\xfe\x00x",
        None,
        42,
    ],
)
def test_result_is_storable(raw: object) -> None:
    out = safe_text(raw)  # type: ignore[arg-type]
    out.encode("utf-8")
    assert is_safe(out)
    assert "\x00" not in out and "\x1b" not in out


def test_tabs_newlines_and_non_ascii_kept() -> None:
    assert safe_text("for straße in x:\n\tpass") == "for straße in x:\n\tpass"
    assert safe_text("a\r\nb\rc") == "a\nb\nc"


@pytest.mark.parametrize("limit", [0, 1, 30, 31, 64, 1000])
def test_cap_in_utf8_bytes_on_a_character_boundary(limit: int) -> None:
    text = "é" * 10_000  # 2 bytes each: a cut in the middle of one must not leave half a character
    out = safe_text(text, limit)
    assert len(out.encode("utf-8")) <= limit
    if limit >= 64:
        assert out.endswith(f"[... {20_000 - len(out.rsplit(chr(10), 1)[0].encode())} bytes cut]")
    assert is_safe(out)


def test_ten_megabytes_are_cut_and_the_cut_is_counted() -> None:
    out = safe_text("x" * 10_000_000, 4096)
    assert len(out.encode()) <= 4096
    kept = out.count("x")
    assert f"[... {10_000_000 - kept} bytes cut]" in out


def test_short_text_untouched() -> None:
    assert safe_text("ok", 10) == "ok"
    assert not is_safe("\ud800") and not is_safe("a\x00") and is_safe("a\tb\n")
