"""Credentials inside URLs never leave the process: one function every writer of a manifest, the run
index, provenance and logs goes through.

    redact("https://user:pw@host/x?X-Amz-Signature=abc&n=1")  -> "https://***@host/x?X-Amz-Signature=***&n=1"
    redact_value({"url": ..., "list": [...]})                   -> the same structure, strings redacted

What counts as a credential: the user-info part of any `scheme://user:password@host` (also
`s3://KEY:SECRET@bucket/...`: the whole user-info goes, a user name alone can be a token), and the
values of query parameters that carry signatures or tokens (X-Amz-Signature, X-Amz-Credential,
X-Amz-Security-Token, token, access_token, sig, ...). A fingerprint hashes the redacted config
(artifacts/manifest.py fingerprint()), so the same data fetched with other credentials is the
same artifact, and nothing secret can be recovered from a fingerprint.

Flow parameters: Prefect stores a flow run's parameters on its server, where the UI shows them to
everyone. seal() replaces each credential-bearing string of a parameter by its redacted form and
keeps the original in this process's environment (NANORUN_SECRETS, a JSON map redacted -> original);
unseal(), where a flow or task uses the value, puts it back. The CLI's flows run in its process (or,
for a deployment, on a worker started with the same NANORUN_SECRETS), so nothing secret is ever a
parameter.

Logs: install_log_redaction() (done when `artifacts` is imported) wraps the log-record factory, so
every record of every logger (nanorun's, Prefect's run loggers, torchrun lines forwarded by the
launcher) is redacted once its message is formatted, tracebacks included.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

MASK = "***"
# user-info ends at the first '/' in a URL; an unencoded AWS secret key may hold '/' though, and a
# bucket name never holds ':', so `s3://KEY:SE/CRET@bucket` is recognised too.
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@?#\"'<>]+@"
                       r"|\b((?:s3|gs)://)[^/\s@?#:\"'<>]+:[^\s@\"'<>]+@")
SECRET_PARAMS = ("x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature",
                 "x-goog-credential", "awsaccesskeyid", "signature", "sig", "token", "access_token",
                 "refresh_token", "id_token", "api_key", "apikey", "key", "secret", "client_secret",
                 "password", "passwd", "auth", "authorization")
_PARAMS = re.compile(r"([?&;](?:%s)=)[^&#\s\"'<>]*" % "|".join(re.escape(p) for p in SECRET_PARAMS), re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it replaced by ***."""
    if "://" not in text and "=" not in text:
        return text  # the common case, cheaply
    return _PARAMS.sub(lambda m: m.group(1) + MASK, _USERINFO.sub(lambda m: (m.group(1) or m.group(2)) + MASK + "@", text))


def _map_strings(value: Any, fn) -> Any:
    """A copy of a JSON-like value (dicts, lists, tuples, strings) with fn applied to every string."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_strings(v, fn) for v in value)
    return value


def redact_value(value: Any) -> Any:
    """A copy of a JSON-like value with every string redacted."""
    return _map_strings(value, redact)


SECRETS_ENV = "NANORUN_SECRETS"


def _secrets() -> dict[str, str]:
    try:
        found = json.loads(os.environ.get(SECRETS_ENV) or "{}")
    except ValueError:
        raise ValueError(f"{SECRETS_ENV} is not a JSON object of redacted -> original strings") from None
    return found if isinstance(found, dict) else {}


def seal(value: Any) -> Any:
    """A copy of a JSON-like value safe to pass as a Prefect parameter: every string that holds a
    credential is redacted, and the original is kept in this process's environment for unseal()."""
    known = _secrets()
    before = dict(known)

    def one(text: str) -> str:
        clean = redact(text)
        if clean != text:
            known[clean] = text
        return clean
    sealed = _map_strings(value, one)
    if known != before:
        os.environ[SECRETS_ENV] = json.dumps(known)
    return sealed


def unseal(value: Any) -> Any:
    """The value seal() was given: each sealed string back to its original (others unchanged)."""
    known = _secrets()
    return _map_strings(value, lambda text: known.get(text, text)) if known else value


_installed = False


def install_log_redaction() -> None:
    """Redact every log record created in this process from now on (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    make = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: let the handler report it as usual
            return record
        clean = redact(message)
        if clean != message:
            # Redact the arguments one by one where that cleans the message: formatters that unpack
            # record.args (uvicorn's access log: client, method, path, ...) keep working.
            args = tuple(redact(a) if isinstance(a, str) else a for a in record.args) \
                if isinstance(record.args, tuple) and isinstance(record.msg, str) else ()
            try:
                split = args and redact(record.msg) % args == clean
            except (TypeError, ValueError):
                split = False
            record.msg, record.args = (redact(record.msg), args) if split else (clean, ())
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(factory)
