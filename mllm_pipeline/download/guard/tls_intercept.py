"""A throw-away certificate authority for the guard proxy, so it can see inside HTTPS.

The guard proxy terminates the downloader's TLS connection with a certificate for the requested host, signed by a
CA made for this one run (an ECDSA P-256 key that lives only in memory and in a private temporary directory), and
opens its own TLS connection to the real host, verified against the normal trust store (``SSL_CERT_FILE`` /
``REQUESTS_CA_BUNDLE`` / the system's). The downloaders, started as children with ``SSL_CERT_FILE``,
``REQUESTS_CA_BUNDLE`` and ``CURL_CA_BUNDLE`` pointing at :attr:`LocalCA.bundle` (this CA plus the normal trust
store), trust the guard; nothing else does.

Why by hand: the libraries that intercept TLS (mitmproxy and its kin) are whole proxies with their own event loop,
addon system and a per-request cost several times the guard's; what is needed here is only "a leaf certificate for
host X", which ``cryptography`` does in a few calls.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import ssl
import tempfile
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mllm_pipeline.storage import make_scratch_dir


def trust_store_files() -> list[str]:
    """The CA files a normal client of this process would trust: the CA-bundle variables, else certifi's bundle
    and OpenSSL's default file."""
    files = [os.environ[v] for v in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE") if os.environ.get(v)]
    if not files:
        try:
            import certifi

            files.append(certifi.where())
        except ImportError:
            pass
        default = ssl.get_default_verify_paths().cafile
        if default:
            files.append(default)
    return [f for f in dict.fromkeys(files) if os.path.isfile(f)]


def upstream_context(files: list[str] | None = None) -> ssl.SSLContext:
    """How the guard verifies real servers: the trust store this process was given (see :func:`trust_store_files`),
    or ``files``."""
    ctx = ssl.create_default_context()
    for f in trust_store_files() if files is None else files:
        ctx.load_verify_locations(cafile=f)
    return ctx


class LocalCA:
    """A CA for one guard proxy: ``server_context(host)`` gives a TLS server context with a leaf for ``host``."""

    def __init__(self, common_name: str = "mllm-pipeline guard proxy (per-run CA)"):
        self._dir = make_scratch_dir("mllm-guard-ca-")  # holds the CA's keys: a killed run's goes with the next run
        os.chmod(self._dir, 0o700)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())  # one key for every leaf of this run
        now = dt.datetime.now(dt.timezone.utc)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        self._name = name
        self._ski = ski
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self._key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self.ca_file = os.path.join(self._dir, "ca.pem")
        with open(self.ca_file, "wb") as f:
            f.write(self.cert_pem)
        self.bundle = os.path.join(self._dir, "bundle.pem")
        with open(self.bundle, "wb") as f:
            f.write(self.cert_pem)
            for path in trust_store_files():
                with open(path, "rb") as src:
                    f.write(b"\n" + src.read())
        self._leaf_key_file = os.path.join(self._dir, "leaf.key")
        with open(self._leaf_key_file, "wb") as f:
            f.write(self._leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._lock = threading.Lock()

    def state(self) -> dict[str, bytes]:
        """What another process needs to issue leaves of this CA (:meth:`from_state`): the keys and the certificate."""
        pem = serialization.Encoding.PEM
        fmt, none = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        return {"key": self._key.private_bytes(pem, fmt, none), "leaf_key": self._leaf_key.private_bytes(pem, fmt, none),
                "cert": self.cert_pem}

    @classmethod
    def from_state(cls, state: dict[str, bytes]) -> LocalCA:
        """The same CA in another process (a relay process of a multi-process guard); it writes no bundle."""
        self = cls.__new__(cls)
        self._dir = make_scratch_dir("mllm-guard-ca-")
        os.chmod(self._dir, 0o700)
        self._key = serialization.load_pem_private_key(state["key"], None)
        self._leaf_key = serialization.load_pem_private_key(state["leaf_key"], None)
        self.cert_pem = state["cert"]
        self.cert = x509.load_pem_x509_certificate(self.cert_pem)
        self._name = self.cert.subject
        self._ski = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        self.ca_file = self.bundle = ""
        self._leaf_key_file = os.path.join(self._dir, "leaf.key")
        with open(self._leaf_key_file, "wb") as f:
            f.write(state["leaf_key"])
        self._contexts = {}
        self._lock = threading.Lock()
        return self

    def env(self, ca_only: bool = False) -> dict[str, str]:
        """CA-bundle variables that make urllib, requests, curl and ffmpeg trust this CA (and the usual ones).

        ``ca_only``: trust this CA alone, for a process whose every TLS connection goes through the guard. That is
        much cheaper for urllib (img2dataset), which loads ``SSL_CERT_FILE`` again for every connection: 0.4 ms for
        this one certificate against 20+ ms for a bundle of the system's 145 (measured in bench/guard_bench.py)."""
        f = self.ca_file if ca_only else self.bundle
        return {"SSL_CERT_FILE": f, "REQUESTS_CA_BUNDLE": f, "CURL_CA_BUNDLE": f}

    def leaf_pem(self, host: str) -> bytes:
        now = dt.datetime.now(dt.timezone.utc)
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        cert = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
            .issuer_name(self._name).public_key(self._leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def server_context(self, host: str) -> ssl.SSLContext:
        with self._lock:
            ctx = self._contexts.get(host)
            if ctx is not None:
                return ctx
            fd, path = tempfile.mkstemp(suffix=".pem", dir=self._dir)
            with os.fdopen(fd, "wb") as f:
                f.write(self.leaf_pem(host) + self.cert_pem)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(path, self._leaf_key_file)
            os.unlink(path)
            if len(self._contexts) > 10_000:
                self._contexts.clear()
            self._contexts[host] = ctx
            return ctx

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
