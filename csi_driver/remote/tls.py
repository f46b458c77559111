"""Mutual TLS of the engine API between nodes: the files, the credentials of both ends, and `certs`.

A TLS directory holds `ca.crt`, `tls.crt`, `tls.key` (a kubernetes.io/tls Secret plus ca.crt, the layout
cert-manager writes). One certificate, with the DNS name ENGINE_NAME, serves every engine and every controller:
an engine refuses a peer whose certificate that CA did not sign (at the handshake), and a controller checks that
the engine it dialled (an address learned from a Lease, so no name of its own) presents ENGINE_NAME.
Files are read again for every new server or channel, so a renewed Secret takes effect on the next connection.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

import grpc

#: the DNS name engine certificates carry and controllers verify
ENGINE_NAME = "flashcopy-engine"
FILES = ("ca.crt", "tls.crt", "tls.key")


@dataclass(frozen=True)
class TlsFiles:
    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, tls_dir: str) -> TlsFiles:
        """The three files of tls_dir; ValueError naming what is missing or empty."""
        if not tls_dir:
            raise ValueError("no TLS directory given (--tls-dir): the engine API between nodes is mutual TLS only")
        data = []
        for name in FILES:
            path = os.path.join(tls_dir, name)
            try:
                with open(path, "rb") as f:
                    content = f.read()
            except OSError as e:
                raise ValueError(f"cannot read {path}: {e.strerror}") from None
            if b"-----BEGIN" not in content:
                raise ValueError(f"{path} holds no PEM data")
            data.append(content)
        return cls(*data)

    def server_credentials(self) -> grpc.ServerCredentials:
        # require_client_auth: a client without a certificate from this CA fails the handshake
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


def channel_options() -> list[tuple[str, str]]:
    """Verify ENGINE_NAME whatever address was dialled."""
    return [("grpc.ssl_target_name_override", ENGINE_NAME)]


# ------------------------------------------------------------------------------------------ certificates


def make_certificates(*, days: int = 3650, name: str = ENGINE_NAME) -> tuple[bytes, bytes, bytes, bytes]:
    """(ca.crt, ca.key, tls.crt, tls.key) PEM: a fresh CA and one certificate for `name` signed by it, usable
    as server and as client certificate (ECDSA P-256)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    until = now + datetime.timedelta(days=days)

    def pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name}-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(name)]
    if _is_ip(name):
        sans = [x509.IPAddress(ipaddress.ip_address(name))]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(until)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return (ca.public_bytes(serialization.Encoding.PEM), pem_key(ca_key),
            cert.public_bytes(serialization.Encoding.PEM), pem_key(key))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def write_certificates(out: str, *, days: int = 3650, name: str = ENGINE_NAME) -> list[str]:
    """Write ca.crt, ca.key, tls.crt, tls.key into out (keys 0600); existing files are never overwritten."""
    paths = [os.path.join(out, n) for n in ("ca.crt", "ca.key", "tls.crt", "tls.key")]
    present = [p for p in paths if os.path.exists(p)]
    if present:
        raise FileExistsError(f"refusing to overwrite {', '.join(present)}")
    os.makedirs(out, exist_ok=True)
    for path, data in zip(paths, make_certificates(days=days, name=name)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if path.endswith(".key") else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return paths


def run_certs(out: str, *, days: int = 3650) -> int:
    """`csi-flashcopy certs --out DIR`."""
    try:
        paths = write_certificates(out, days=days)
    except (FileExistsError, OSError) as e:
        print(f"csi-flashcopy certs: {e}")
        return 1
    for p in paths:
        print(p)
    print(f"ca.key signs further certificates: keep it out of the cluster. For the Secret:\n"
          f"  kubectl create secret generic NAME --from-file={out}/ca.crt --from-file={out}/tls.crt "
          f"--from-file={out}/tls.key")
    return 0
