"""TLS for peer traffic: the node's own key and certificate, the TLS contexts, and HTTPS pinned to a peer.

Every node makes an EC P-256 key and a self-signed certificate at its first start and keeps both in one
PEM file, `peer-tls.pem`, under its config folder ($XDG_CONFIG_HOME/cake-swarm, ~/.config/cake-swarm
without it, or --config-dir). Peers trust no certificate authority: what authenticates a link is the
cluster-key handshake (swarm.auth), whose MACs cover the fingerprint (sha256 of the DER bytes) of the
listener's certificate as each side saw it, so a relay that shows its own certificate fails it. Shard
fetches then pin the certificate that the peer's handshake proved. Peer links speak TLS 1.3 only.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

IDENTITY_FILE = "peer-tls.pem"
CERT_YEARS = 20    # nothing checks the dates (peers pin fingerprints), but a cert must have some


def config_root() -> Path:
    """$XDG_CONFIG_HOME/cake-swarm (~/.config/cake-swarm without it)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "cake-swarm"


def fingerprint(der: bytes) -> str:
    """A certificate's fingerprint: sha256 of its DER bytes, in hex."""
    return hashlib.sha256(der).hexdigest()


def seen_fingerprint(connection) -> str:
    """The fingerprint of the certificate the other side showed on a TLS connection (an aiohttp websocket,
    response connection or transport: anything with get_extra_info); "" when it is not TLS."""
    ssl_object = connection.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return fingerprint(der) if der else ""


@dataclass(frozen=True)
class Identity:
    """This node's key and certificate (one PEM file) and the certificate's fingerprint."""
    path: Path
    fingerprint: str

    def server_context(self) -> ssl.SSLContext:
        return server_context(self.path)


def make_identity_pem() -> bytes:
    """A new EC P-256 key and a self-signed certificate for it, as one PEM (key first)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cake-swarm node")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365 * CERT_YEARS))
            .sign(key, hashes.SHA256()))
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
            + cert.public_bytes(serialization.Encoding.PEM))


def load_identity(folder: str | os.PathLike) -> Identity:
    """The identity kept in `folder`, made there first if it has none.

    Written to a private temporary file and linked into place, so that daemons starting at once with one
    config folder all end up with the same file (the first link wins) and nobody reads half of one."""
    folder = Path(folder)
    path = folder / IDENTITY_FILE
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".peer-tls-")   # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(make_identity_pem())
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    try:
        pem = path.read_bytes()
        cert = x509.load_pem_x509_certificate(pem[pem.index(b"-----BEGIN CERTIFICATE-----"):])
        server_context(path)   # the key must match the certificate
    except (ValueError, ssl.SSLError) as e:
        raise ValueError(f"{path}: not a key and certificate ({e}); delete it to make a new one") from None
    return Identity(path, fingerprint(cert.public_bytes(serialization.Encoding.DER)))


def server_context(cert_file: str | os.PathLike, key_file: str | os.PathLike | None = None,
                   minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> ssl.SSLContext:
    """A server context showing cert_file (key in key_file, or in cert_file itself)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = minimum
    context.load_cert_chain(cert_file, key_file)
    return context


def client_context() -> ssl.SSLContext:
    """A client context for peer links: TLS 1.3, no CA and no host name (the handshake authenticates)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(frozen=True)
class Endpoint:
    """A peer's TLS listener and the certificate it must show there."""
    url: str           # https://addr:peer_port
    fingerprint: str

    @property
    def pin(self) -> aiohttp.Fingerprint:
        return aiohttp.Fingerprint(bytes.fromhex(self.fingerprint))


class PeerClient:
    """HTTPS to peers (shard and side-file fetches). `find(base_url)` turns the address people know a
    node by (http://addr:port, its dashboard) into its Endpoint, or raises ConnectionError."""

    def __init__(self, find: Callable[[str], Awaitable[Endpoint]]):
        self.find = find
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context()))

    async def close(self) -> None:
        await self.session.close()
