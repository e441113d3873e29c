"""One certificate from an ACME server (RFC 8555), with certbot's own `acme` library.

`obtain(server, names, key_pem)` does what RFC 8555 section 7 describes, one
library call per step: the account (found again by its key, or made), a new
order for the names, an HTTP-01 answer for each authorization, the CSR, and
the issued chain.  Our part is only the glue:

- the HTTP-01 answer is a file `CHALLENGES/TOKEN` holding the key
  authorization; the web program's `[web] http` listener (the port 80 role)
  serves it at `/.well-known/acme-challenge/TOKEN` (web/public.py), the way
  certbot's webroot plugin works.  The files go when the order is done.
- every failure becomes one `ACMEError` whose text is the one log line an
  operator needs ("rate limited by the ACME server (rateLimited): ...; it asks
  us to wait 3600 s"), with `retry_after` when the server said how long
  (a 429 or 503 with Retry-After, RFC 8555 6.6).

Nothing here writes the certificate or its key: cli/cert.py does, only after
`obtain` returned a chain, so a failed attempt leaves the old certificate
where it was.  The account key is ECDSA P-256 (ES256), whatever the
certificate's key type.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWKEC

log = logging.getLogger("acme")

USER_AGENT = "mailroom"
# A token is base64url (RFC 8555 8.3): nothing else may become a file name.
TOKEN = re.compile(r"[A-Za-z0-9_-]{16,256}")


class ACMEError(Exception):
    """The ACME server refused, failed or could not be reached; the text is the log line."""

    def __init__(self, text: str, *, retry_after: float | None = None, rate_limited: bool = False) -> None:
        super().__init__(text)
        self.retry_after = retry_after
        self.rate_limited = rate_limited


@dataclass(frozen=True)
class Server:
    """Where the ACME server is and what we keep for it."""

    directory: str  # the directory URL
    ca_file: Path | None  # trust for the server's own HTTPS; None: the system's CAs
    email: str  # contact, may be empty
    account_key: Path  # PEM, created (0600) on first use
    challenges: Path  # folder of HTTP-01 answers, served by the web program
    timeout: float = 45.0  # each HTTP request
    deadline: float = 90.0  # validation and issuance of one order


def account_key(path: Path) -> JWKEC:
    """The account key, made (ECDSA P-256, owner-only) when there is none yet."""
    if not path.exists():
        private = ec.generate_private_key(ec.SECP256R1())
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    loaded = serialization.load_pem_private_key(path.read_bytes(), None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise ACMEError(f"{path}: the ACME account key must be an ECDSA P-256 key")
    return JWKEC(key=loaded)


def obtain(server: Server, names: list[str], key_pem: bytes) -> str:
    """The certificate chain (PEM) for `names` with the key `key_pem`; ACMEError otherwise."""
    retry: dict[str, float] = {}
    try:
        return _obtain(server, names, key_pem, retry)
    except ACMEError:
        raise
    except messages.Error as exc:
        raise _server_error(exc, retry.get("seconds")) from None
    except errors.ValidationError as exc:
        raise ACMEError(_validation_text(exc)) from None
    except errors.TimeoutError:
        raise ACMEError(f"the ACME server did not validate and issue within {server.deadline:.0f} s") from None
    except errors.ClientError as exc:
        raise _client_error(exc, retry.get("seconds")) from None
    except requests.exceptions.SSLError as exc:
        raise ACMEError(f"cannot trust the ACME server {server.directory}: {_short(exc)} "
                        "([acme] directory_ca_file names the CA of a private server)") from None
    except requests.exceptions.RequestException as exc:
        raise ACMEError(f"cannot reach the ACME server {server.directory}: {_short(exc)}") from None
    except errors.Error as exc:
        raise ACMEError(f"ACME: {exc}") from None


def _obtain(server: Server, names: list[str], key_pem: bytes, retry: dict[str, float]) -> str:
    key = account_key(server.account_key)
    # requests takes a CA bundle's path where the library passes its verify flag.
    verify = cast(bool, str(server.ca_file)) if server.ca_file else True
    net = client.ClientNetwork(key, alg=ES256, verify_ssl=verify, user_agent=USER_AGENT,
                               timeout=int(server.timeout))
    # The library reads no Retry-After except while polling: a hook of requests keeps the last one.
    net.session.hooks["response"].append(lambda r, *a, **k: _note_retry_after(r, retry))
    acme = client.ClientV2(client.ClientV2.get_directory(server.directory, net), net)
    _account(acme, server)
    csr = crypto_util.make_csr(key_pem, names)
    order = acme.new_order(csr)
    written: list[Path] = []
    try:
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue  # the server remembers this name was proven recently
            challb = _http01(authz)
            response, validation = challb.chall.response_and_validation(key)
            written.append(_publish(server.challenges, challb.chall.encode("token"), validation))
            acme.answer_challenge(challb, response)
        deadline = dt.datetime.now() + dt.timedelta(seconds=server.deadline)
        done = acme.poll_and_finalize(order, deadline)
    finally:
        for path in written:
            path.unlink(missing_ok=True)
    return str(done.fullchain_pem)


def _account(acme: client.ClientV2, server: Server) -> None:
    """Register, or find the account this key already has (RFC 8555 7.3.1: 200 + Location)."""
    new = messages.NewRegistration.from_data(
        email=server.email or None, terms_of_service_agreed=True
    )
    try:
        acme.new_account(new)
    except errors.ConflictError as exc:
        acme.net.account = messages.RegistrationResource(uri=exc.location, body=messages.Registration())


def _http01(authz: messages.AuthorizationResource) -> messages.ChallengeBody:
    for challb in authz.body.challenges:
        if isinstance(challb.chall, challenges.HTTP01):
            return challb
    name = authz.body.identifier.value
    raise ACMEError(f"the ACME server offers no HTTP-01 challenge for {name}")


def _publish(folder: Path, token: str, validation: str) -> Path:
    if not TOKEN.fullmatch(token):
        raise ACMEError(f"the ACME server sent a challenge token that is not base64url: {token[:40]!r}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / token
    # Readable by the web program, which may serve as another user than this command.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(validation)
    os.chmod(path, 0o644)
    return path


def _note_retry_after(response: requests.Response, retry: dict[str, float]) -> None:
    value = response.headers.get("Retry-After")
    if response.status_code in (429, 503) and value:
        seconds = _retry_seconds(value)
        if seconds is not None:
            retry["seconds"] = seconds


def _retry_seconds(value: str) -> float | None:
    """Retry-After as seconds: a number of seconds or an HTTP date (RFC 9110 10.2.3)."""
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - time.time())


def _server_error(exc: messages.Error, retry_after: float | None) -> ACMEError:
    code = exc.code or exc.typ or "error"
    detail = " ".join(str(exc.detail or exc.description or "").split())[:300]
    wait = f"; it asks us to wait {retry_after:.0f} s" if retry_after is not None else ""
    if exc.code == "rateLimited":
        return ACMEError(f"rate limited by the ACME server ({code}): {detail}{wait}",
                         retry_after=retry_after, rate_limited=True)
    return ACMEError(f"the ACME server refused ({code}): {detail}{wait}", retry_after=retry_after)


def _client_error(exc: errors.ClientError, retry_after: float | None) -> ACMEError:
    response = exc.args[0] if exc.args else None
    if isinstance(response, requests.Response):
        wait = f"; it asks us to wait {retry_after:.0f} s" if retry_after is not None else ""
        what = "rate limited by the ACME server" if response.status_code == 429 else "the ACME server failed"
        return ACMEError(
            f"{what}: HTTP {response.status_code} {response.reason} at {response.url}{wait}",
            retry_after=retry_after, rate_limited=response.status_code == 429,
        )
    return ACMEError(f"ACME: {_short(exc)}", retry_after=retry_after)


def _validation_text(exc: errors.ValidationError) -> str:
    parts = []
    for authz in exc.failed_authzrs:
        for challb in authz.body.challenges:
            if challb.error is not None:
                detail = " ".join(str(challb.error.detail or challb.error.code).split())[:200]
                parts.append(f"{authz.body.identifier.value}: {detail}")
    return "the ACME server could not validate " + ("; ".join(parts) or "the names") + \
        " (is [web] http reachable on port 80 of every name?)"


def _short(exc: Any) -> str:
    return " ".join(str(exc).split())[:300]
