"""The record format shared by the file-based sources (JSONL, webdataset shards) and their bad-record policy.

A record is an image + text pair or an interleaved ``segments`` document (``jsonl.py`` shows the
format). A bad one never stops a run by default: :class:`SkipReport` counts it under its reason (the
``REASON_*`` strings, the keys of ``ChameleonDataModule.skipped``) and logs it with its location
(``file:line``, ``shard:key``); with ``data.strict=true`` it raises the source's error naming the
record, the problem and the fix.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

# Skip reasons: the keys these sources add to ``ChameleonDataModule.skipped``.
REASON_NOT_UTF8 = "text is not valid UTF-8"
REASON_BAD_JSON = "malformed JSON line"
REASON_BAD_RECORD = "malformed record (expected image+text or segments)"
REASON_UNKNOWN_SEGMENT = "unknown segment type"
REASON_EMPTY_TEXT = "empty text"
REASON_MISSING_IMAGE = "image file missing"
REASON_TOO_LONG = "document longer than seq_len (data.overflow=reject)"
REASON_BAD_IMAGE = "unreadable image"
#: ImageLoadError message fragments (chameleon_lite.vq.image_io) -> a finer reason than REASON_BAD_IMAGE.
IMAGE_REASONS: tuple[tuple[str, str], ...] = (
    ("file is empty", "image file is empty (0 bytes)"),
    ("exceeds max_pixels", "image above data.max_pixels"),
    ("smaller than min_side", "image below data.min_side"),
    ("corrupt or truncated", "image data corrupt or truncated"),
    ("not a readable image", "not a readable image file"),
)
MAX_LOGGED_SKIPS = 20  # per source file, skipped records are logged one by one up to here, then only counted
STRICT_HINT = "(data.strict=true stops at the first bad record; data.strict=false skips and counts them)"

T = TypeVar("T")


@dataclass
class SkipReport:
    """Counts (or, strict, raises ``error`` for) bad records; logs the first ``MAX_LOGGED_SKIPS`` with ``where``.

    ``where`` locates the record for the user: ``file:line`` for JSONL, ``shard:key`` for the webdataset source.
    """

    skipped: Counter
    strict: bool
    error: type[ValueError]
    logged: int = 0

    def __call__(self, where: str, reason: str, detail: str, fix: str) -> None:
        if self.strict:
            raise self.error(f"{where}: {detail}; {fix} {STRICT_HINT}")
        self.skipped[reason] += 1
        self.logged += 1
        if self.logged <= MAX_LOGGED_SKIPS:
            log.warning("skipping record %s: %s [counted as: %s]", where, detail, reason)
        elif self.logged == MAX_LOGGED_SKIPS + 1:
            log.warning("more skipped records are counted but not logged (see the per-epoch summary)")

    def overlong(self, where: str, length: int, seq_len: int, overflow: str) -> bool:
        """True (and counted) if ``data.overflow=reject`` drops a document of ``length`` tokens."""
        if overflow != "reject" or length <= seq_len:
            return False
        self(where, REASON_TOO_LONG, f"document of {length} tokens is longer than data.seq_len={seq_len}",
             "raise data.seq_len, set data.overflow=split, or shorten the document")
        return True


def image_reason(message: str) -> str:
    """The skip reason of an :class:`ImageLoadError` message (finer than ``REASON_BAD_IMAGE`` where known)."""
    return next((reason for fragment, reason in IMAGE_REASONS if fragment in message), REASON_BAD_IMAGE)


def parse_segments(where: str, segments: object, report: SkipReport,
                   resolve: Callable[[str], T]) -> list[tuple[str, str | T]] | None:
    """An interleaved document's ``segments`` list -> parts ``("text", text)`` / ``("image", resolve(path))``.

    ``resolve`` maps an image segment's ``path`` to what the source loads it from (a file next to
    the JSONL file, a member of a webdataset sample). None if the document is bad (``report`` counted it).
    """
    if not isinstance(segments, list) or not segments:
        report(where, REASON_BAD_RECORD, "'segments' must be a non-empty list",
               'write {"segments": [{"type": "text", "text": ...}, {"type": "image", "path": ...}]}')
        return None
    parts: list[tuple[str, str | T]] = []
    for k, seg in enumerate(segments):
        kind = seg.get("type") if isinstance(seg, dict) else None
        if kind == "text" and isinstance(seg.get("text"), str):
            text = check_text(f"{where} (segment {k})", seg["text"], report)
            if text is None:
                return None
            parts.append(("text", text))
        elif kind == "image" and isinstance(seg.get("path"), str):
            parts.append(("image", resolve(seg["path"])))
        elif kind in ("text", "image"):
            field_name = "text" if kind == "text" else "path"
            report(where, REASON_BAD_RECORD, f"segment {k} of type {kind!r} has no string {field_name!r}",
                   f"give each {kind} segment a {field_name!r} string")
            return None
        else:
            report(where, REASON_UNKNOWN_SEGMENT, f"segment {k} has unknown type {kind!r}",
                   "use segment types 'text' and 'image' only")
            return None
    return parts


def check_text(where: str, text: str, report: SkipReport) -> str | None:
    """``text`` if it is valid, non-blank Unicode; else None (``report`` counted it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        report(where, REASON_NOT_UTF8, "text contains an unpaired surrogate escape (not valid Unicode)",
               "fix the text's \\u escapes")
        return None
    if not text.strip():
        report(where, REASON_EMPTY_TEXT, "text is empty", "give the record a non-empty text or remove it")
        return None
    return text
