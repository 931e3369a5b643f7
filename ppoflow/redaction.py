"""Secrets never leave the process: the one redactor of the project (tracking, the MLflow server, logs).

`redact` replaces values whose key names a secret (token, password, secret, api key, credentials;
not `stop_token` or `tokenizer`) and the password of any `scheme://user:password@host` URI inside
a string, recursively through mappings and lists. `redact_uri` is the string case alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"

_SECRET_KEY = re.compile(
    r"(^|[_\-.])(token|auth|password|passwd|secret|credentials?|(api|access|secret|private)[_\-]?key|apikey)$",
    re.IGNORECASE,
)
_SPECIAL_TOKEN_KEY = re.compile(r"(^|[_\-.])(stop|eos|bos|pad|unk|sep|cls|mask)[_\-]token$", re.IGNORECASE)
# The password runs up to the last `@` before the path: `user:p@ss@host` hides `p@ss`. The user and
# the host may be empty (`redis://:pw@host`, `postgresql://u:pw@/db?host=/socket`).
_URI_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*:)(?P<password>[^\s/]+)(?=@)")


def is_secret_key(key: str) -> bool:
    """`hub_token`, `password`, `client_secret`, `api_key`... but not `stop_token` or `tokenizer`."""
    return bool(_SECRET_KEY.search(key)) and not _SPECIAL_TOKEN_KEY.search(key)


def redact_uri(text: str) -> str:
    """`text` with the password of every `scheme://user:password@host` URI in it replaced by `***`."""
    return _URI_PASSWORD.sub(lambda match: match.group("head") + REDACTED, text)


def redact(value: Any, key: str | None = None) -> Any:
    """Hide secrets: the whole value when its key names one, and passwords inside URIs; recurses."""
    if key is not None and is_secret_key(str(key)) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        return redact_uri(value)
    if isinstance(value, Mapping):
        return {name: redact(item, str(name)) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(item, key) for item in value]
    return value
