"""Where the API is and which key to use, by the CLI's rule: arguments, then the
`CAPSA_ENDPOINT` / `CAPSA_API_KEY` environment, then `.capsa/dev.env` in the current directory
(written by deploy/scripts/up.sh). Never a parent directory's: whoever can write a parent (a
shared /tmp, a cloned repo) could otherwise point the client, and the key it sends, at a
server of theirs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigurationError

DEV_ENV = Path(".capsa") / "dev.env"


@dataclass(frozen=True)
class Target:
    """A resolved endpoint: `address` is `host:port` for grpc, `secure` means TLS."""

    address: str
    secure: bool
    api_key: str = field(repr=False)


def parse_dev_env(text: str) -> dict[str, str]:
    """`KEY=VALUE` lines; blank lines and `#` comments are skipped, an `export ` prefix and
    surrounding quotes are accepted (as the CLI reads the file)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ")
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def split_endpoint(endpoint: str) -> tuple[str, bool]:
    """`http://host:port` (or a bare `host:port`) is plaintext, `https://host:port` is TLS."""
    endpoint = endpoint.strip()
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        scheme, rest = "http", endpoint
    rest = rest.removesuffix("/")
    if scheme not in ("http", "https"):
        raise ConfigurationError(f"endpoint {endpoint!r}: the scheme must be http or https")
    if not rest or "/" in rest:
        raise ConfigurationError(f"endpoint {endpoint!r}: expected [http[s]://]host:port")
    return rest, scheme == "https"


def resolve(
    endpoint: str | None,
    api_key: str | None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Target:
    environ = os.environ if environ is None else environ
    endpoint = endpoint or environ.get("CAPSA_ENDPOINT") or None
    api_key = api_key or environ.get("CAPSA_API_KEY") or None
    if endpoint is None or api_key is None:
        path = (Path.cwd() if cwd is None else cwd) / DEV_ENV
        if path.is_file():
            try:
                found = parse_dev_env(path.read_text())
            except OSError as e:
                raise ConfigurationError(f"cannot read {path}: {e}") from e
            endpoint = endpoint or found.get("CAPSA_ENDPOINT") or None
            api_key = api_key or found.get("CAPSA_API_KEY") or None
    if endpoint is None:
        raise ConfigurationError(
            "no endpoint: pass endpoint=, set CAPSA_ENDPOINT, or run from the directory "
            "holding .capsa/dev.env"
        )
    if api_key is None:
        raise ConfigurationError(
            "no API key: pass api_key=, set CAPSA_API_KEY, or run from the directory "
            "holding .capsa/dev.env"
        )
    if not all(" " <= c <= "~" for c in api_key):
        raise ConfigurationError("the API key contains characters not allowed in a header")
    address, secure = split_endpoint(endpoint)
    return Target(address=address, secure=secure, api_key=api_key)
