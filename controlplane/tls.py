"""Credentials and TLS for the Redis connection, carried in one URL.

kcp processes connect with `connection.connect(settings.redis_url)`, and the agent hands
``KCP_REDIS_URL`` to each kernel it starts (in the environment, never on the command line).
So that every process, kernels included, gets the same credentials and TLS options, the
separate settings (``KCP_REDIS_USERNAME``, ``KCP_REDIS_PASSWORD``, ``KCP_REDIS_TLS_*``) are
folded into that URL, in the form redis-py reads itself::

    rediss://USER:PASSWORD@host:6380/0?ssl_ca_certs=/etc/kcp/ca.crt&ssl_certfile=...&ssl_keyfile=...

A value set explicitly overrides the one in the URL; `rediss://` URLs verify the server's
certificate *and* host name unless told otherwise (redis-py alone skips the host name).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

#: URL query parameters (redis-py's names) for the TLS files.
CA_PARAM, CERT_PARAM, KEY_PARAM = "ssl_ca_certs", "ssl_certfile", "ssl_keyfile"
CHECK_HOSTNAME_PARAM = "ssl_check_hostname"
#: The URL schemes kcp connects with (redis-py's, and Sentinel's and Cluster's in
#: `controlplane.redis.connect`, which parses those).
URL_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster", "rediss+cluster")
#: The schemes that connect with TLS.
TLS_SCHEMES = ("rediss", "rediss+cluster")


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    """What to fold into a URL; None leaves the URL's own value (if any) alone."""

    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool | None = None


def _readable(path: Path, what: str) -> str:
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ValueError(f"{what} {str(path)!r} is not a readable file")
    return str(path.absolute())


def effective_url(url: str, options: ConnectionOptions) -> str:
    """`url` with `options` folded in; ValueError (naming the problem) when they do not fit.

    Idempotent: folding the same options into the result again changes nothing, so a kernel
    that inherits both ``KCP_REDIS_URL`` and ``KCP_REDIS_PASSWORD`` from its agent gets the same URL.
    """
    parts = urlsplit(url)
    if parts.scheme not in URL_SCHEMES:
        raise ValueError(
            f"redis_url must be a URL such as redis://host:6379/0, with a scheme among "
            f"{', '.join(s + '://' for s in URL_SCHEMES)} (got {redact_url(url)!r})"
        )
    if parts.scheme in ("redis", "rediss"):
        try:
            parts.port  # noqa: B018 -- urlsplit checks the port only when asked
        except ValueError:
            raise ValueError(
                f"redis_url has a port that is not a number 0-65535 ({redact_url(url)!r})"
            ) from None
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    tls = parts.scheme in TLS_SCHEMES
    files = {CA_PARAM: options.ca_file, CERT_PARAM: options.cert_file, KEY_PARAM: options.key_file}
    given = [name for name, value in files.items() if value is not None]
    if (given or options.check_hostname is not None) and not tls:
        raise ValueError(
            "TLS settings (redis_tls_*) need a rediss:// URL (or rediss+cluster://); "
            f"redis_url uses {parts.scheme}:// ({redact_url(url)})"
        )
    for name, what in ((CA_PARAM, "redis_tls_ca_file"), (CERT_PARAM, "redis_tls_cert_file")):
        value = files[name]
        if value is not None:
            query[name] = _readable(value, what)
    if options.key_file is not None:
        query[KEY_PARAM] = _readable(options.key_file, "redis_tls_key_file")
    if (CERT_PARAM in query) != (KEY_PARAM in query):
        raise ValueError("a TLS client certificate needs its key: set both redis_tls_cert_file and _key_file")
    if tls:
        if options.check_hostname is not None:
            query[CHECK_HOSTNAME_PARAM] = "true" if options.check_hostname else "false"
        query.setdefault(CHECK_HOSTNAME_PARAM, "true")  # redis-py's own default is not to check
    netloc = parts.netloc
    if options.username is not None or options.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        old_user, _, old_password = userinfo.partition(":")
        user = quote(options.username, safe="") if options.username is not None else old_user
        password = quote(options.password, safe="") if options.password is not None else old_password
        netloc = f"{user}:{password}@{hostport}" if password else f"{user}@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), parts.fragment))


def redact_url(url: str) -> str:
    """`url` with its password replaced by ``***``: safe for logs and error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return urlunsplit((parts.scheme, f"{user}:***@{hostport}", parts.path, parts.query, parts.fragment))


def url_username(url: str) -> str | None:
    """The ACL user name a URL logs in as (None: the `default` user)."""
    userinfo, at, _ = urlsplit(url).netloc.rpartition("@")
    name = unquote(userinfo.partition(":")[0]) if at else ""
    return name or None


def uses_tls(url: str) -> bool:
    return urlsplit(url).scheme in TLS_SCHEMES


__all__ = ["ConnectionOptions", "effective_url", "redact_url", "url_username", "uses_tls"]
