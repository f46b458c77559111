"""Mutual TLS of the engine API between nodes: the files, the identities, the credentials of both ends, `certs`.

A TLS directory holds `ca.crt`, `tls.crt`, `tls.key` (a kubernetes.io/tls Secret plus ca.crt, the layout
cert-manager writes). Who is who is the certificate's DNS names (subject alternative names; the CN is ignored):

- CONTROLLER_NAME (`flashcopy-controller`): the controller's driver. The only client an engine's TCP port serves
  (remote.access: controller RPCs only; the Node verbs stay on the engine's 0600 unix socket).
- node_name(node) (`<label>.node.flashcopy`, label from the node name: see node_name): the engine of that node,
  its server certificate; the controller dials a node's engine with that name as the TLS target, so an engine
  whose certificate names another node fails the handshake. A wildcard `*.node.flashcopy` certificate names
  every node (the chart's generated and cert-manager Secrets: one node Secret for a DaemonSet) and is weaker:
  any node holding it can pose as any other node's engine to a controller that was pointed at it (docs/install.md,
  "Security"). Node identities are admitted as clients for no RPC yet; cross-node reads will admit per-node
  names for the RPCs they need (remote.access.TCP_POLICY).

Files are read again for every new server or channel, so a renewed Secret takes effect on the next connection.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

#: the DNS name of the controller's client certificate
CONTROLLER_NAME = "flashcopy-controller"
#: node certificates are named <label>.NODE_DOMAIN (not a real DNS domain: only this driver's CA signs it)
NODE_DOMAIN = "node.flashcopy"
#: the one name of a shared node certificate (chart, cert-manager): every node's engine
NODE_WILDCARD = f"*.{NODE_DOMAIN}"
FILES = ("ca.crt", "tls.crt", "tls.key")
#: client roles the engine's TCP port tells apart
CONTROLLER, NODE = "controller", "node"
# a Kubernetes node name: an RFC 1123 subdomain
_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def valid_node_name(node: str) -> bool:
    return 0 < len(node) <= 253 and bool(_NODE_NAME.match(node))


def node_name(node: str) -> str:
    """The DNS name a node's engine certificate carries: one DNS label (so a wildcard certificate can cover every
    node) made of the node name's first 40 characters, dots as dashes, and 16 hex digits of its SHA-256 (node
    names may be FQDNs longer than a label; the digest keeps two names from sharing a label)."""
    digest = hashlib.sha256(node.encode()).hexdigest()[:16]
    readable = re.sub(r"[^a-z0-9-]", "-", node.lower())[:40].strip("-")
    return f"{readable}-{digest}.{NODE_DOMAIN}" if readable else f"n-{digest}.{NODE_DOMAIN}"


def _matches(pattern: str, name: str) -> bool:
    """TLS host name matching as the gRPC client does it: exact, or a wildcard for the left-most label."""
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name


@dataclass(frozen=True)
class Peer:
    """A client of the engine's TCP port as its certificate names it."""

    role: str  # CONTROLLER, NODE or "" (neither, or both: refused everywhere)
    names: tuple[str, ...]

    def is_node(self, node: str) -> bool:
        """Whether the certificate names exactly this node (a wildcard does not: it names no node in particular)."""
        return self.role == NODE and node_name(node) in self.names

    def __str__(self) -> str:
        return f"{self.role or 'unknown'}({','.join(self.names) or 'no DNS names'})"


def role_of(names: Sequence[str]) -> str:
    controller = CONTROLLER_NAME in names
    node = any(n.endswith("." + NODE_DOMAIN) for n in names)
    if controller == node:  # neither, or a certificate claiming both: no role
        return ""
    return CONTROLLER if controller else NODE


@functools.lru_cache(maxsize=64)
def dns_names(pem: bytes) -> tuple[str, ...]:
    """The DNS subject alternative names of a PEM certificate."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return ()
    return tuple(san.get_values_for_type(x509.DNSName))


def peer_of(auth_context: Mapping[str, Any]) -> Peer:
    """The client of a call from grpc's auth_context (the verified peer certificate of a mutual TLS call; each
    value is a list of bytes, whatever the stubs say)."""
    pems: list[bytes] = list(auth_context.get("x509_pem_cert") or ())
    names = dns_names(pems[0]) if pems else ()
    return Peer(role_of(names), names)


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

    @property
    def names(self) -> tuple[str, ...]:
        return dns_names(self.cert)

    def check_engine(self, node: str) -> None:
        """ValueError unless this is a node certificate the controllers accept for node's engine."""
        if role_of(self.names) != NODE or not any(_matches(n, node_name(node)) for n in self.names):
            raise ValueError(f"tls.crt names {', '.join(self.names) or 'no DNS name'}: the engine of node {node} "
                             f"needs a node certificate naming {node_name(node)} (or {NODE_WILDCARD})")

    def check_controller(self) -> None:
        """ValueError unless this is the controller's certificate (engines serve no other client)."""
        if role_of(self.names) != CONTROLLER:
            raise ValueError(f"tls.crt names {', '.join(self.names) or 'no DNS name'}: the controller needs the "
                             f"controller certificate ({CONTROLLER_NAME})")

    def server_credentials(self) -> grpc.ServerCredentials:
        # require_client_auth: a client without a certificate from this CA fails the handshake; which CA-signed
        # client may call what is remote.access's decision, by the certificate's names
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


def channel_options(node: str) -> list[tuple[str, str]]:
    """Verify that the engine dialled (an address from node's Lease) presents a certificate naming node."""
    return [("grpc.ssl_target_name_override", node_name(node))]


# ------------------------------------------------------------------------------------------ certificates


@dataclass(frozen=True)
class Authority:
    """A CA that issues the identities (`csi-flashcopy certs`)."""

    cert: bytes
    key: bytes

    @classmethod
    def create(cls, *, days: int = 3650) -> Authority:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flashcopy-ca")])
        ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=days))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                           content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=False, encipher_only=False,
                                           decipher_only=False), critical=True)
              .sign(key, hashes.SHA256()))
        return cls(_pem_cert(ca), _pem_key(key))

    def issue(self, common_name: str, names: Sequence[str], *, days: int = 3650) -> TlsFiles:
        """A certificate for these DNS names (an IP address becomes an IP name), usable as server and client."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        ca = x509.load_pem_x509_certificate(self.cert)
        ca_key = serialization.load_pem_private_key(self.key, password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        now = datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(n)) if _is_ip(n) else x509.DNSName(n)
                                        for n in names]
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(min(now + datetime.timedelta(days=days), ca.not_valid_after_utc))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        return TlsFiles(self.cert, _pem_cert(cert), _pem_key(key))

    def controller(self, *, days: int = 3650) -> TlsFiles:
        return self.issue(CONTROLLER_NAME, [CONTROLLER_NAME], days=days)

    def node(self, node: str | None = None, *, days: int = 3650) -> TlsFiles:
        """node's engine certificate; None: the shared wildcard one that names every node."""
        if node is None:
            return self.issue("flashcopy-node", [NODE_WILDCARD], days=days)
        return self.issue(f"flashcopy-node:{node}", [node_name(node)], days=days)


def _pem_cert(cert: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)  # type: ignore[attr-defined,no-any-return]


def _pem_key(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined,no-any-return]
                             serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _write(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_identity(out: str, files: TlsFiles) -> str:
    """A TLS directory (ca.crt, tls.crt, tls.key; the key 0600) at out, which must not exist yet."""
    os.makedirs(out, mode=0o700)
    for name, data in zip(FILES, (files.ca, files.cert, files.key)):
        _write(os.path.join(out, name), data, 0o600 if name.endswith(".key") else 0o644)
    return out


def write_certificates(out: str, *, days: int = 3650, nodes: Sequence[str] = ()) -> list[str]:
    """out/ca.crt and out/ca.key (a new CA, or the one already there), and a TLS directory per identity not
    there yet: out/controller, out/node (the shared wildcard node certificate), out/nodes/<node> for each of
    nodes. Nothing existing is overwritten. Returns the paths written."""
    bad = [n for n in nodes if not valid_node_name(n)]
    if bad:
        raise ValueError(f"not a Kubernetes node name: {', '.join(map(repr, bad))}")
    os.makedirs(out, exist_ok=True)
    ca_crt, ca_key = os.path.join(out, "ca.crt"), os.path.join(out, "ca.key")
    written: list[str] = []
    if os.path.exists(ca_crt) or os.path.exists(ca_key):
        with open(ca_crt, "rb") as f1, open(ca_key, "rb") as f2:
            ca = Authority(f1.read(), f2.read())
    else:
        ca = Authority.create(days=days)
        _write(ca_crt, ca.cert, 0o644)
        _write(ca_key, ca.key, 0o600)
        written += [ca_crt, ca_key]
    wanted: list[tuple[str, str | None]] = [("controller", None), ("node", None)]
    wanted += [(os.path.join("nodes", n), n) for n in nodes]
    for sub, node in wanted:
        path = os.path.join(out, sub)
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        files = ca.controller(days=days) if sub == "controller" else ca.node(node, days=days)
        written.append(write_identity(path, files))
    return written


def run_certs(out: str, *, days: int = 3650, nodes: Sequence[str] = ()) -> int:
    """`csi-flashcopy certs --out DIR [--node NAME ...]`."""
    try:
        paths = write_certificates(out, days=days, nodes=nodes)
    except (ValueError, OSError) as e:
        print(f"csi-flashcopy certs: {e}")
        return 1
    for p in paths:
        print(p)
    print(f"ca.key signs further certificates (run again with --node NAME): keep it out of the cluster.\n"
          f"For the chart (tls.existingSecrets):\n"
          f"  kubectl create secret generic csi-flashcopy-controller-tls --from-file={out}/controller\n"
          f"  kubectl create secret generic csi-flashcopy-node-tls --from-file={out}/node\n"
          f"{out}/nodes/<node> is one node's own certificate, for engines given their node's directory.")
    return 0
