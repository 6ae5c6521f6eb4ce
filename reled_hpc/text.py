"""Make untrusted text (LLM answers, what an LLM-written program prints or returns) safe to store.

Every text that crosses from the LLM or the sandbox child into logs, HDF5, the response cache or a
prompt goes through `safe_text`: it is then valid UTF-8 (lone surrogates and undecodable bytes
become U+FFFD), holds no NUL or terminal control characters (which HDF5 strings and consoles do not
survive), and is at most `max_bytes` long in UTF-8, with a marker saying how much was cut.
"""

from __future__ import annotations

import re

# C0 controls except tab and newline, DEL, C1 controls: they rewrite terminals and NUL ends HDF5 strings.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def cut_marker(cut_bytes: int) -> str:
    return f"\n[... {cut_bytes} bytes cut]"


def safe_text(text: str | bytes | None, max_bytes: int | None = None) -> str:
    """Valid UTF-8, no control characters but tab/newline, at most `max_bytes` UTF-8 bytes."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    elif not isinstance(text, str):
        text = str(text)
    # lone surrogates (from JSON "\ud800" or surrogateescape) cannot be encoded: replace them
    text = _SURROGATE.sub("\ufffd", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("\ufffd", text)
    if max_bytes is None:
        return text
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    room = max_bytes - len(cut_marker(len(raw)).encode("utf-8"))  # the marker's longest form
    if room < 0:  # no room to say what was cut
        return raw[:max_bytes].decode("utf-8", "ignore")
    # cut on a character boundary: "ignore" drops a split multi-byte sequence at the end
    kept = raw[:room].decode("utf-8", "ignore")
    return kept + cut_marker(len(raw) - len(kept.encode("utf-8")))


def is_safe(text: str) -> bool:
    """True when `text` encodes to UTF-8 and holds no control characters but tab and newline."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return _CONTROL.search(text) is None and "\r" not in text
