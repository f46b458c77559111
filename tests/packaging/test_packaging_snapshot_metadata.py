"""snapshotMetadata.enabled (issue 12, changed-block tracking): the external-snapshot-metadata sidecar where the
controller sidecars run, its TLS Secret (generated, existing, cert-manager), the Service backup clients dial, the
SnapshotMetadataService that points them at it, the sidecar's RBAC; strict schema validation of all of it; and a
default render without any of it. The sidecar's flags are also parsed by its real binary in
test_packaging_consistency.py (test_sidecar_flags_exist)."""

from __future__ import annotations

import base64
import datetime
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.packaging import packaging_manifests as pm

SIDECAR = "csi-snapshot-metadata"
SVC = f"{pm.RELEASE}-snapshot-metadata"
SECRET = f"{SVC}-tls"
TLS_DIR = "/etc/snapshot-metadata/tls"
SMS = ("cbt.storage.k8s.io/v1beta1", "SnapshotMetadataService")
CRD = pm.PEER_SNAPSHOT_METADATA / "crd" / "cbt.storage.k8s.io_snapshotmetadataservices.yaml"
DNS_NAMES = [f"{SVC}.{pm.NAMESPACE}", SVC, f"{SVC}.{pm.NAMESPACE}.svc", f"{SVC}.{pm.NAMESPACE}.svc.cluster.local"]
# (apiGroup, resource) -> verbs: exactly what the sidecar does (README of ../shared/peers/snapshot-metadata)
RULES = {
    ("authentication.k8s.io", "tokenreviews"): {"create"},
    ("authorization.k8s.io", "subjectaccessreviews"): {"create"},
    ("snapshot.storage.k8s.io", "volumesnapshots"): {"get", "list"},
    ("snapshot.storage.k8s.io", "volumesnapshotcontents"): {"get", "list"},
    ("snapshot.storage.k8s.io", "volumesnapshotclasses"): {"get", "list"},
    ("cbt.storage.k8s.io", "snapshotmetadataservices"): {"get"},
}


def _one(objs: list[pm.Obj], kind: str, name: str | None = None) -> pm.Obj:
    found = [o for o in pm.of_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {[o['metadata']['name'] for o in found]}"
    return found[0]


def _workload(objs: list[pm.Obj], kind: str) -> pm.Obj:
    return _one(objs, kind)


def _container(spec: pm.Obj, name: str) -> pm.Obj:
    (c,) = [c for c in spec["containers"] if c["name"] == name]
    return c


def _sms(objs: list[pm.Obj]) -> pm.Obj:
    (sms,) = [o for o in objs if (o["apiVersion"], o["kind"]) == SMS]
    return sms


def _values(name: str) -> pm.Obj:
    return pm.chart_values(pm.SNAPSHOT_METADATA_MATRIX[name])


def _check_sidecar(objs: list[pm.Obj], values: pm.Obj) -> tuple[pm.Obj, pm.Obj]:
    """The sidecar runs in the pods of the controller sidecars only; returns (workload, its pod spec)."""
    single = values["topology"] == "single-node"
    host, other = ("DaemonSet", "Deployment") if single else ("Deployment", "DaemonSet")
    for o, spec in pm.pod_specs(objs):
        names = {c["name"] for c in spec["containers"]}
        assert (SIDECAR in names) == (o["kind"] == host), f"{o['kind']}: {names}"
        assert (SIDECAR in names) == ("csi-provisioner" in names)
    w = _workload(objs, host)
    spec = w["spec"]["template"]["spec"]
    s = values["snapshotMetadata"]
    c = _container(spec, SIDECAR)
    assert c["image"] == "registry.k8s.io/sig-storage/csi-snapshot-metadata:v1.1.0"
    assert c["args"] == [
        "--csi-address=/csi/csi.sock",
        f"--tls-cert={TLS_DIR}/tls.crt",
        f"--tls-key={TLS_DIR}/tls.key",
        f"--port={s['port']}",
        f"--http-endpoint=:{s['httpPort']}",
        "--timeout=60s",
        f"--v={values['sidecars']['logLevel']}",
        *s["extraArgs"],
    ]
    # the controller socket: the same socket-dir as csi-flashcopy serve, which listens on unix:///csi/csi.sock
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["socket-dir"]["mountPath"] == "/csi"
    driver = _container(spec, "csi-flashcopy")
    assert "--endpoint=unix:///csi/csi.sock" in driver["args"]
    assert {m["name"]: m["mountPath"] for m in driver["volumeMounts"]}["socket-dir"] == "/csi"
    assert mounts["snapshot-metadata-tls"] == {"name": "snapshot-metadata-tls", "mountPath": TLS_DIR,
                                               "readOnly": True}
    # the TLS files are the sidecar's only: no other container mounts them
    for other_c in spec["containers"]:
        if other_c["name"] != SIDECAR:
            assert "snapshot-metadata-tls" not in {m["name"] for m in other_c.get("volumeMounts", [])}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"smd-grpc": s["port"], "smd-http": s["httpPort"]}
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "smd-http"}
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert not pm.flag_value(c["args"], "--kubeconfig")  # in-cluster config, the pod's ServiceAccount
    assert not [x for x in pm.of_kind(objs, other)
                if SIDECAR in {c["name"] for c in x["spec"]["template"]["spec"]["containers"]}]
    return w, spec


def _check_service_and_sms(objs: list[pm.Obj], values: pm.Obj, w: pm.Obj, secret_name: str) -> pm.Obj:
    s = values["snapshotMetadata"]
    svc = _one(objs, "Service", SVC)
    assert svc["metadata"]["namespace"] == pm.NAMESPACE
    assert svc["spec"]["type"] == "ClusterIP"
    # selects exactly the pods that run the sidecar
    pod_labels = w["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["selector"]["app.kubernetes.io/component"] == w["metadata"]["labels"][
        "app.kubernetes.io/component"]
    (port,) = svc["spec"]["ports"]
    assert port == {"name": "grpc", "port": s["port"], "targetPort": "smd-grpc", "protocol": "TCP"}
    vol = next(v for v in w["spec"]["template"]["spec"]["volumes"] if v["name"] == "snapshot-metadata-tls")
    assert vol["secret"]["secretName"] == secret_name
    sms = _sms(objs)
    assert sms["metadata"]["name"] == values["driverName"] and "namespace" not in sms["metadata"]
    # the address is the Service's DNS name and port
    host, dial_port = sms["spec"]["address"].rsplit(":", 1)
    assert host == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}" and int(dial_port) == port["port"]
    assert sms["spec"]["audience"] == (s["audience"] or values["driverName"])
    return sms


def _check_rbac(objs: list[pm.Obj], spec: pm.Obj) -> None:
    role = _one(objs, "ClusterRole", SVC)
    rules: dict[tuple[str, str], set[str]] = {}
    for r in role["rules"]:
        for g in r["apiGroups"]:
            for res in r["resources"]:
                assert (g, res) not in rules, f"{g}/{res} twice"
                rules[(g, res)] = set(r["verbs"])
        if "snapshotmetadataservices" in r["resources"]:
            # only its own SnapshotMetadataService (the sidecar gets it by the driver's name for the audience)
            assert r["resourceNames"] == [pm.chart_values()["driverName"]]
        else:
            assert "resourceNames" not in r
    assert rules == RULES
    # no secrets: the chart's VolumeSnapshotClass names no snapshotter secrets, the only reason the sidecar reads one
    assert not any(res == "secrets" for _, res in rules)
    binding = _one(objs, "ClusterRoleBinding", SVC)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": SVC}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": spec["serviceAccountName"],
                                    "namespace": pm.NAMESPACE}]


def _pem(secret: pm.Obj, key: str) -> bytes:
    return base64.b64decode(secret["data"][key])


def test_enabled_multi_node(smd_renders: dict[str, list[pm.Obj]]) -> None:
    objs, values = smd_renders["snapshot-metadata"], _values("snapshot-metadata")
    w, spec = _check_sidecar(objs, values)
    assert w["kind"] == "Deployment" and spec["serviceAccountName"] == f"{pm.RELEASE}-controller"
    # the non-root controller pod reads the key through its fsGroup, like the engine TLS
    vol = next(v for v in spec["volumes"] if v["name"] == "snapshot-metadata-tls")
    assert vol["secret"]["defaultMode"] == 0o440 and spec["securityContext"]["fsGroup"] == 10001
    sms = _check_service_and_sms(objs, values, w, SECRET)
    secret = _one(objs, "Secret", SECRET)
    assert secret["type"] == "kubernetes.io/tls" and secret["metadata"]["namespace"] == pm.NAMESPACE
    assert sorted(secret["data"]) == ["ca.crt", "tls.crt", "tls.key"]
    # the client trusts exactly the CA that signed the sidecar's certificate
    assert sms["spec"]["caCert"] == secret["data"]["ca.crt"]
    assert sms["spec"]["audience"] == "flashcopy.csi.dev" and sms["spec"]["address"].endswith(":50051")
    _check_rbac(objs, spec)
    # the engine's own TLS Secret is untouched and separate
    for role in ("controller", "node"):
        assert _one(objs, "Secret", f"{pm.RELEASE}-{role}-tls")["data"]["ca.crt"] != secret["data"]["ca.crt"]


def test_enabled_single_node(smd_renders: dict[str, list[pm.Obj]]) -> None:
    objs, values = smd_renders["snapshot-metadata-single-node"], _values("snapshot-metadata-single-node")
    w, spec = _check_sidecar(objs, values)
    assert w["kind"] == "DaemonSet" and spec["serviceAccountName"] == f"{pm.RELEASE}-node"
    assert not pm.of_kind(objs, "Deployment")
    sms = _check_service_and_sms(objs, values, w, SECRET)
    (secret,) = pm.of_kind(objs, "Secret")  # no engine TLS in this topology: only the sidecar's
    assert sms["spec"]["caCert"] == secret["data"]["ca.crt"]
    assert sms["spec"]["address"] == f"{SVC}.{pm.NAMESPACE}:50151"
    assert sms["spec"]["audience"] == "backup.example.com"
    _check_rbac(objs, spec)


def test_generated_certificate_names_the_service(smd_renders: dict[str, list[pm.Obj]]) -> None:
    objs = smd_renders["snapshot-metadata"]
    secret = _one(objs, "Secret", SECRET)
    ca = x509.load_pem_x509_certificate(_pem(secret, "ca.crt"))
    cert = x509.load_pem_x509_certificate(_pem(secret, "tls.crt"))
    key = load_pem_private_key(_pem(secret, "tls.key"), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert san == DNS_NAMES
    # the host the client dials (spec.address) is one of them: TLS verification passes
    assert _sms(objs)["spec"]["address"].rsplit(":", 1)[0] in san
    assert cert.issuer == ca.subject
    ca_key = ca.public_key()
    if isinstance(ca_key, rsa.RSAPublicKey):
        ca_key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
    else:
        assert isinstance(ca_key, ec.EllipticCurvePublicKey)
        ca_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc) / datetime.timedelta(days=1)
    assert 3640 <= days <= 3660
    # a renamed release and namespace move the names, and a cluster domain is honoured
    objs = pm.helm_template_smd({"snapshotMetadata": {"enabled": True, "clusterDomain": "corp.example"}},
                                release="backup", namespace="storage")
    cert = x509.load_pem_x509_certificate(_pem(_one(objs, "Secret", "backup-csi-flashcopy-snapshot-metadata-tls"),
                                               "tls.crt"))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    name = "backup-csi-flashcopy-snapshot-metadata"
    assert san == [f"{name}.storage", name, f"{name}.storage.svc", f"{name}.storage.svc.corp.example"]
    assert _sms(objs)["spec"]["address"] == f"{name}.storage:50051"


def test_generated_secret_reused_through_lookup() -> None:
    text = (pm.CHART / "templates" / "snapshot-metadata.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $secret' in text
    assert 'pick $old.data "ca.crt" "tls.crt" "tls.key"' in text


# any PEM the schema accepts; the chart only base64-encodes it into spec.caCert
_CA_PEM = ("-----BEGIN CERTIFICATE-----\n"
           "MIIBkTCB+wIJAKHBfpegPjMCMA0GCSqGSIb3DQEBCwUAMBExDzANBgNVBAMMBnNtZC1j\n"
           "-----END CERTIFICATE-----\n")


def test_existing_secret_with_ca(helm: str) -> None:
    values = {"snapshotMetadata": {"enabled": True, "tls": {"existingSecret": "smd-tls", "caCert": _CA_PEM}}}
    objs = pm.helm_template_smd(values)
    assert not [o for o in pm.of_kind(objs, "Secret") if "snapshot-metadata" in o["metadata"]["name"]]
    assert not pm.of_kind(objs, "Certificate")
    w, _ = _check_sidecar(objs, pm.chart_values(values))
    sms = _check_service_and_sms(objs, pm.chart_values(values), w, "smd-tls")
    assert base64.b64decode(sms["spec"]["caCert"]).decode() == _CA_PEM


def test_cert_manager_certificate(helm: str) -> None:
    issuer = {"name": "smd-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    values = {"snapshotMetadata": {"enabled": True, "tls": {"certManager": {"issuerRef": issuer}, "caCert": _CA_PEM}}}
    objs = pm.helm_template_smd(values)
    assert not [o for o in pm.of_kind(objs, "Secret") if "snapshot-metadata" in o["metadata"]["name"]]
    cert = _one(objs, "Certificate", SECRET)
    assert cert["apiVersion"] == "cert-manager.io/v1" and cert["metadata"]["namespace"] == pm.NAMESPACE
    spec = cert["spec"]
    assert spec["secretName"] == SECRET and spec["dnsNames"] == DNS_NAMES and spec["commonName"] == DNS_NAMES[0]
    assert spec["issuerRef"] == issuer and spec["isCA"] is False and "server auth" in spec["usages"]
    w, _ = _check_sidecar(objs, pm.chart_values(values))
    sms = _check_service_and_sms(objs, pm.chart_values(values), w, SECRET)
    assert base64.b64decode(sms["spec"]["caCert"]).decode() == _CA_PEM


@pytest.mark.parametrize("tls", [{"existingSecret": "smd-tls"}, {"certManager": {"issuerRef": {"name": "ca"}}}])
def test_ca_needed_when_the_chart_does_not_make_the_secret(helm: str, tmp_path: Path, tls: pm.Obj) -> None:
    # helm template has no cluster to read ca.crt from: the render stops and says what to set
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump({"snapshotMetadata": {"enabled": True, "tls": tls}}))
    r = pm.helm("template", pm.RELEASE, str(pm.CHART), "-f", str(f), *pm.SNAPSHOT_METADATA_API, check=False)
    assert r.returncode != 0 and "snapshotMetadata.tls.caCert" in r.stderr, r.stderr


def test_refuses_without_the_crd(helm: str) -> None:
    r = pm.helm("template", pm.RELEASE, str(pm.CHART), "--set", "snapshotMetadata.enabled=true", check=False)
    assert r.returncode != 0
    assert "SnapshotMetadataService CRD" in r.stderr and "--api-versions" in r.stderr, r.stderr


def test_default_render_has_none_of_it(renders: dict[str, list[pm.Obj]],
                                       kustomized: dict[str, list[pm.Obj]]) -> None:
    assert pm.chart_values()["snapshotMetadata"]["enabled"] is False
    for name, objs in [*renders.items(), *kustomized.items()]:
        assert not [o for o in objs if o["kind"] == "SnapshotMetadataService"], name
        assert not [o for o in objs if "snapshot-metadata" in o["metadata"]["name"]], name
        for _, spec, c in pm.containers(objs):
            assert c["name"] != SIDECAR, name
            assert "snapshot-metadata-tls" not in {v["name"] for v in spec["volumes"]}, name
    # with the default off, the generated kustomize manifests do not mention it
    for path in (pm.REPO / "deploy" / "kubernetes").rglob("*.yaml"):
        assert "snapshot-metadata" not in path.read_text(), path
    # the CRD is not shipped in the chart's crds/ (helm would install it even when the value is off)
    for path in (pm.CHART / "crds").glob("*.yaml"):
        assert "cbt.storage.k8s.io" not in path.read_text()


BAD_VALUES: dict[str, tuple[pm.Obj, str]] = {
    "port-as-string": ({"snapshotMetadata": {"port": "grpc"}}, "/snapshotMetadata/port"),
    "port-too-big": ({"snapshotMetadata": {"port": 70000}}, "/snapshotMetadata/port"),
    "enabled-as-string": ({"snapshotMetadata": {"enabled": "yes"}}, "/snapshotMetadata/enabled"),
    "unknown-key": ({"snapshotMetadata": {"replicas": 2}}, "replicas"),
    "latest-image": ({"snapshotMetadata": {"image": {"tag": "latest"}}}, "/snapshotMetadata/image/tag"),
    "two-tls-sources": ({"snapshotMetadata": {"tls": {"existingSecret": "a", "certManager": {"issuerRef": {
        "name": "ca"}}}}}, "/snapshotMetadata/tls"),
    "ca-not-pem": ({"snapshotMetadata": {"tls": {"caCert": "abc"}}}, "/snapshotMetadata/tls/caCert"),
}


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_wrong_values_are_rejected(helm: str, tmp_path: Path, name: str) -> None:
    values, where = BAD_VALUES[name]
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values))
    r = pm.helm("template", "x", str(pm.CHART), "-f", str(f), *pm.SNAPSHOT_METADATA_API, check=False)
    assert r.returncode != 0 and "values don't meet the specifications of the schema" in r.stderr, r.stderr
    assert where in r.stderr, r.stderr


@pytest.mark.parametrize("version", ("1.31", "1.34"))
def test_builtin_kinds_validate_strict(smd_renders: dict[str, list[pm.Obj]], version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate",
                             reason="pip install kubernetes-validate (.ci/setup.d/30-k8s-tools.sh)")
    failures, checked = [], 0
    for name, objs in smd_renders.items():
        for o in objs:
            if o["kind"] in pm.CRD_KINDS or (o["apiVersion"], o["kind"]) == SMS:
                continue
            try:
                kv.validate(o, version, strict=True)
                checked += 1
            except (kv.ValidationError, kv.SchemaNotFoundError) as e:
                failures.append(f"{name} {o['kind']}/{o['metadata']['name']}: {str(e).splitlines()[0]}")
    assert not failures, "\n".join(failures)
    assert checked >= 30


def test_snapshot_metadata_service_validates_against_the_crd(smd_renders: dict[str, list[pm.Obj]]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from tests.packaging.test_packaging_validate import _strict

    if not CRD.exists():
        pytest.skip(f"no SnapshotMetadataService CRD at {CRD} (the snapshot-metadata peer is absent)")
    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["group"] == "cbt.storage.k8s.io" and crd["spec"]["scope"] == "Cluster"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1" and v["served"]]
    validator = jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))
    for name, objs in smd_renders.items():
        sms = _sms(objs)
        body = {k: v for k, v in sms.items() if k != "metadata"}
        errors = [e.message for e in validator.iter_errors(body)]
        assert not errors, f"{name}: {errors}"
        # caCert is []byte in the API: base64 of a PEM certificate
        assert base64.b64decode(sms["spec"]["caCert"]).startswith(b"-----BEGIN CERTIFICATE-----")
    # a misspelt field fails (the validator is not accepting everything)
    bad = {k: v for k, v in _sms(smd_renders["snapshot-metadata"]).items() if k != "metadata"}
    bad["spec"] = {**bad["spec"], "adress": "x:1"}
    assert list(validator.iter_errors(bad))
