"""Masking of card numbers and secrets in free text: logs, error messages, stored text.

- `mask_card_numbers`: a run of 13-19 digits (single spaces or dashes allowed between
  digits, as people write card numbers) that passes the Luhn check becomes the first
  six digits, stars, and the last four (PCI DSS allows showing those): "411111******1111".
  One exception, in log messages only: an unbroken run right after the label `epoch=` or
  `fence=` (exactly that, lower case, glued) is an ownership epoch / fencing token,
  written so by our own log lines, and is left whole (see _LABEL).
- `redact_secrets`: API keys (`pck_<prefix>_<secret>`) keep their public prefix only
  (`pck_<prefix>_****`), webhook secrets become `whsec_****`, and a bearer token after
  `Bearer` becomes `****`.
- `scrub`: both, secrets first (a secret may contain digits that look like a card; masked
  first, the rest of the secret would no longer match its pattern and leak).
- `error_body`: the cluster's one error shape with `scrub` applied; every process that
  answers an error (the region node, the geo router) builds its bodies here, so one
  masking rule covers every error body a client can see.
- `RedactFilter`: the logging filter that applies `scrub` to every record; the node's
  (`region_node.logs`) and the geo router's log handlers both carry it, so one masking
  rule covers every log line too.

Built for the hot path: the patterns are compiled once, a string without a digit run or
a secret marker costs one regex scan, and the Luhn check runs only on candidates.
"""

from __future__ import annotations

import logging
import re

MASK = "*"

# A run of digit groups joined by single spaces or dashes ("4111 1111-1111 1111 7"), taken
# whole: the card inside is found group by group (see _mask_run), so a card followed by
# another number ("<card>-2", "<card> 3 items") is still caught.
_DIGIT_GROUPS = re.compile(r"\d+(?:[ -]\d+)*")
_GROUP_SPLIT = re.compile(r"([ -])")
# Cheap first pass (one character-class loop): is there any long run of digits at all?
_DIGIT_RUN = re.compile(r"\d[\d -]{11,}\d")
# A UUID (our ids, request ids) can hold 16 decimal digits in its first three groups
# (8-4-4) or a 4-4-4-4 run next to hex letters; never a card, never masked.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                   r"[0-9a-fA-F]{12}")

# Ownership epochs and fencing tokens (lock_service.quorum: microsecond clock readings, 16
# digits) pass the Luhn check one time in ten; masked, the epoch of a log line is lost. Our
# log lines write them `epoch=<digits>` / `fence=<digits>`, and only that exact form is
# exempt: the label glued to one unbroken run of digits (a grouped spelling after it is
# masked as usual), "epoch 4111...", "Epoch=4111...", "fence: 4111..." are masked.
# "token=" is deliberately not a label: it is a common query-string parameter that
# clients fill, and request paths are logged.
_LABEL = re.compile(r"(?<![A-Za-z0-9_])(?:epoch|fence)=\Z")

# API keys: pck_<12 [a-z0-9]>_<40 [A-Za-z0-9]>; matched loosely (any secret length from
# 8 on) so a truncated or malformed key is hidden as well.
_API_KEY = re.compile(r"pck_([a-z0-9]{1,32})_[A-Za-z0-9]{8,}")
_WEBHOOK_SECRET = re.compile(r"whsec_[A-Za-z0-9+/=]{8,}")
# A bearer token (token68 characters); short words after "bearer" in prose are left alone.
_BEARER = re.compile(r"(?i)(\bbearer\s+)(?!\*{4})[A-Za-z0-9._~+/=-]{6,}")
_SECRET_HINT = re.compile(r"pck_|whsec_|(?i:bearer)")


def luhn_valid(digits: str) -> bool:
    """True when the string of digits passes the Luhn (mod 10) check."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _in_uuid(text: str, start: int, end: int) -> bool:
    lo = max(0, start - 36)
    for m in _UUID.finditer(text, lo, min(len(text), end + 36)):
        if m.start() < end and start < m.end():
            return True
    return False


def _masked(digits: str) -> str:
    return digits[:6] + MASK * (len(digits) - 10) + digits[-4:]


def _mask_run(run: str) -> str:
    """Mask every card in a run of digit groups: from each group, the longest following
    window of whole groups with 13-19 digits that passes Luhn (a card is never split
    inside a group; more than 19 digits glued together are not a card)."""
    parts = _GROUP_SPLIT.split(run)
    groups, seps = parts[0::2], parts[1::2]
    out: list[str] = []
    i = 0
    while i < len(groups):
        hit, total = -1, 0
        for j in range(i, len(groups)):
            total += len(groups[j])
            if total > 19:
                break
            if total >= 13 and luhn_valid("".join(groups[i:j + 1])):
                hit = j
        end = i if hit < 0 else hit
        out.append(groups[i] if hit < 0 else _masked("".join(groups[i:hit + 1])))
        if end + 1 < len(groups):
            out.append(seps[end])
        i = end + 1
    return "".join(out)


def mask_card_numbers(text: str, *, keep_labelled_ids: bool = False) -> str:
    """Replace every Luhn-valid 13-19 digit number with first six + stars + last four.

    `keep_labelled_ids` (log messages only, see `scrub`) leaves an `epoch=`/`fence=`
    number whole."""
    if not _DIGIT_RUN.search(text):
        return text

    def repl(m: re.Match[str]) -> str:
        run = m.group()
        if sum(ch.isdigit() for ch in run) < 13 or _in_uuid(text, m.start(), m.end()):
            return run
        if keep_labelled_ids and _LABEL.search(text, max(0, m.start() - 7), m.start()):
            # The epoch is the first group alone; whatever follows it is checked as usual.
            head, *tail = _GROUP_SPLIT.split(run, maxsplit=1)
            if len(head) >= 13:
                return head + (tail[0] + _mask_run(tail[1]) if tail else "")
        return _mask_run(run)

    # A mask keeps the last four digits, and they can spell a new card together with the
    # digit groups that follow ("...3092 112334200"): mask again until nothing changes,
    # so the output is stable under scrub. Each pass only turns digits into stars.
    while True:
        masked = _DIGIT_GROUPS.sub(repl, text)
        if masked == text:
            return masked
        text = masked


def redact_secrets(text: str) -> str:
    """Hide API keys (all but their public prefix), webhook secrets and bearer tokens."""
    if not _SECRET_HINT.search(text):
        return text
    text = _API_KEY.sub(lambda m: f"pck_{m.group(1)}_****", text)
    text = _WEBHOOK_SECRET.sub("whsec_****", text)
    return _BEARER.sub(lambda m: m.group(1) + "****", text)


def scrub(text: str, *, keep_labelled_ids: bool = False) -> str:
    """Secrets hidden, then card numbers masked: the text is safe to log, echo or store.

    `keep_labelled_ids` is for the log filter only: our log lines write epochs and fencing
    tokens `epoch=<digits>` / `fence=<digits>` and they stay readable there. Text that is
    stored or echoed (descriptions, error bodies, audit rows) never gets the exemption: a
    client could write its card in that form."""
    return mask_card_numbers(redact_secrets(text), keep_labelled_ids=keep_labelled_ids)


def scrub_value(value: object) -> object:
    """`scrub` applied inside str, dicts, lists and tuples; anything else is returned as is."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: scrub_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_value(v) for v in value]
    if isinstance(value, tuple):
        return tuple(scrub_value(v) for v in value)
    return value


def error_body(type_: str, code: str, message: str,
               param: str | None = None) -> dict[str, dict[str, str]]:
    """The one error shape, `{"error": {"type", "code", "message", "param"?}}`, masked.

    Messages and params may echo what the client sent ("Unknown region '...'"): scrubbed
    here, strictly (no epoch= exemption: a client could write its card in that form), so
    no key or card number is echoed, logged from a body or stored (idempotent replays
    store the body)."""
    err = {"type": type_, "code": code, "message": scrub(message)}
    if param is not None:
        err["param"] = scrub(param)
    return {"error": err}


# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


class RedactFilter(logging.Filter):
    """Scrubs every record before any formatter sees it: no API key, webhook secret or
    full card number reaches a log line (region_node/redact.py).

    The message is rendered (msg % args) and scrubbed, the traceback rendered into
    `exc_text` and scrubbed, and every string in `extra=` fields scrubbed. Installed on
    the handlers (a filter on the root logger would not see child loggers' records).
    """

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drops it."""
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: log what we have, scrubbed
            message = f"{record.msg!s} {record.args!r}"
        clean = scrub(message, keep_labelled_ids=True)
        if clean != message:
            # Rendered once, scrubbed; formatters that need the args (uvicorn's access
            # formatter) only run where nothing had to be hidden.
            record.msg = clean
            record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str | dict | list | tuple):
                setattr(record, key, scrub_value(value))
        return True
