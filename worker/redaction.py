"""Keeping secrets out of output: database passwords and API keys.

Every message, log line, repr and error the worker produces that may hold a URL goes
through :func:`redact` (free text) or :func:`mask_url` (one URL). Both work on text,
not on a parsed URL, so a malformed URL (no scheme, ``postgresql//``, an unclosed
``[``) is masked as well as a good one: whatever sits between the user name's ``:``
and the host's ``@`` is the password, and so is the value of any ``password=``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote

MASK = "***"

# ``password=value`` in a libpq key=value string or a URL's query (``sslpassword``
# too): a quoted value (with backslash escapes, perhaps unterminated) or a bare one.
_KEYWORD = re.compile(r"(?i)((?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s&'\"]*)")
_LEADING = "\"'([<{`"
_TOKEN_WITH_AT = re.compile(r"[^\s@]*@\S*")


def _userinfo_span(text: str) -> tuple[int, int] | None:
    """Where the password of the URL ``text`` sits: after the first ``:`` of the part
    before the last ``@``, starting after ``//`` if there is one."""
    at = text.rfind("@")
    if at < 0:
        return None
    slashes = text.find("//", 0, at)
    start = slashes + 2 if slashes >= 0 else len(text) - len(text.lstrip(_LEADING))
    colon = text.find(":", start, at)
    if colon < 0:
        return None
    return colon + 1, at


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (a URL's ``user:password@``, a
    ``password=`` keyword or query parameter). Safe on malformed URLs."""
    span = _userinfo_span(url)
    if span is not None and span[1] > span[0]:
        url = url[: span[0]] + MASK + url[span[1] :]
    return _KEYWORD.sub(lambda m: m.group(1) + MASK, url)


def url_secrets(url: str | None) -> tuple[str, ...]:
    """The passwords written in ``url`` (raw and percent-decoded), to scrub from any
    text that may echo them, such as a driver's error message."""
    if not url:
        return ()
    found: list[str] = []
    span = _userinfo_span(url)
    if span is not None and span[1] > span[0]:
        found.append(url[span[0] : span[1]])
    for match in _KEYWORD.finditer(url):
        value = match.group(2)
        if value.startswith("'"):
            value = value[1:-1] if len(value) > 1 and value.endswith("'") else value[1:]
        found.append(value)
        found.append(value.replace("\\'", "'").replace("\\\\", "\\"))  # libpq's unescaping
    secrets: list[str] = []
    for value in found:
        for form in (value, unquote(value)):
            if form and form != MASK and form not in secrets:
                secrets.append(form)
    return tuple(secrets)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with every URL password, every ``password=`` value and every one of
    ``secrets`` (API keys, passwords from :func:`url_secrets`) replaced by ``***``."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _TOKEN_WITH_AT.sub(lambda m: mask_url(m.group()), text)
    return _KEYWORD.sub(lambda m: m.group(1) + MASK, text)
