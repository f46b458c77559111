"""Cross-checks between the chart, the kustomize manifests, the CLI and the sidecars, so none can drift:
chart defaults == kustomize, every csi-flashcopy flag exists in the argparse tree, one driver name everywhere,
socket paths that meet, pinned images, sidecar flags the sidecars really have, least-privilege RBAC wiring."""

from __future__ import annotations

import lzma
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import csi_driver
from csi_driver import cli
from tests.packaging import packaging_manifests as pm

SIDECAR_TAGS = {
    "csi-provisioner": "v6.3.0",
    "csi-snapshotter": "v8.6.0",
    "csi-resizer": "v2.2.1",
    "csi-node-driver-registrar": "v2.17.0",
    "livenessprobe": "v2.19.0",
    "csi-snapshot-metadata": "v1.1.0",
}
# Flags defined by node-driver-registrar v2.17.0 and livenessprobe v2.19.0 (cmd/*/main.go), plus klog's --v; the
# other sidecars' flags are read from their real binaries (../shared/peers/k8s/bin, and
# ../shared/peers/snapshot-metadata/bin for csi-snapshot-metadata).
KNOWN_FLAGS = {
    "csi-node-driver-registrar": {"csi-address", "kubelet-registration-path", "plugin-registration-path",
                                  "http-endpoint", "health-port", "timeout", "mode", "enable-pprof", "version", "v"},
    "livenessprobe": {"csi-address", "http-endpoint", "health-port", "probe-timeout", "metrics-address",
                      "metrics-path", "v"},
}
SOCKET = "/csi/csi.sock"
PINNED_IMAGE = r"([a-z0-9.-]+(?::[0-9]+)?/)?[a-z0-9._/-]+:([A-Za-z0-9_][A-Za-z0-9_.-]*)(@sha256:[0-9a-f]{64})?"


def all_renders(
    renders: dict[str, list[pm.Obj]], kustomized: dict[str, list[pm.Obj]],
    smd_renders: dict[str, list[pm.Obj]] | None = None,
) -> Iterator[tuple[str, list[pm.Obj], pm.Obj]]:
    """(name, objects, effective values) for each chart render and each kustomize directory (and each
    snapshotMetadata.enabled render, when given)."""
    for name, objs in renders.items():
        yield f"chart:{name}", objs, pm.chart_values(pm.VALUE_MATRIX[name])
    for name, objs in (smd_renders or {}).items():
        yield f"chart:{name}", objs, pm.chart_values(pm.SNAPSHOT_METADATA_MATRIX[name])
    for name, (_, values) in pm.KUSTOMIZE_RENDERS.items():
        yield f"kustomize:{name}", kustomized[name], pm.chart_values(values)


def test_chart_defaults_equal_kustomize(helm: str, kustomized: dict[str, list[pm.Obj]]) -> None:
    for kust_name, (_, values) in pm.KUSTOMIZE_RENDERS.items():
        chart = pm.by_key([pm.strip_helm_labels(o) for o in pm.helm_template(values, extra=("--include-crds",))])
        kust = pm.by_key(kustomized[kust_name])
        assert sorted(chart) == sorted(kust), f"{kust_name}: objects differ"
        for k in chart:
            assert chart[k] == kust[k], f"{kust_name}: {k} differs between helm template and kubectl kustomize"
    # the base is the chart's default topology, apart from the TLS Secret the installer brings
    assert pm.KUSTOMIZE_RENDERS["base"][1] == {"tls": {"existingSecrets": pm.KUSTOMIZE_TLS_SECRETS}}
    assert kustomized["base"] == kustomized["multi-node"]


def test_csi_flashcopy_args_parse_with_the_cli(renders: dict[str, list[pm.Obj]],
                                                kustomized: dict[str, list[pm.Obj]]) -> None:
    parser = cli.build_parser()
    cli_source = Path(cli.__file__).read_text()
    downward = {"NODE_NAME": "node-1", "POD_IP": "10.244.1.7", "POD_NAMESPACE": pm.NAMESPACE}
    seen = set()
    for name, objs, values in all_renders(renders, kustomized):
        multi = values["topology"] == "multi-node"
        for _, _, c in pm.containers(objs):
            if not pm.is_driver_container(c):
                continue
            env = {e["name"]: e for e in c.get("env", [])}
            referenced = {v for a in c["args"] for v in re.findall(r"\$\(([A-Z_]+)\)", a)}
            # $(VAR) in args expands only from the container's own env
            assert referenced <= set(env), f"{name} {c['name']}: {referenced - set(env)} not in env"
            args = list(c["args"])
            for var, value in downward.items():
                args = [a.replace(f"$({var})", value) for a in args]
            try:
                ns = parser.parse_args(args)  # unknown flags or bad choices exit with status 2
            except SystemExit as e:
                pytest.fail(f"{name} {c['name']}: csi-flashcopy rejects {c['args']} (exit {e.code})")
            seen.add((ns.command, getattr(ns, "mode", "")))
            if ns.command == "doctor":
                # the node pod's init container: reports on the dirs the mounting container gets, never blocks
                assert ns.state_dir == values["stateDir"] and ns.kubelet_dir == values["kubeletDir"]
                assert ns.exit_zero and ns.output == ("json" if values["logFormat"] == "json" else "table")
                continue
            assert ns.log_format == values["logFormat"] and ns.log_level == values["logLevel"]
            assert ns.state_dir == values["stateDir"] or ns.command == "serve" and ns.mode == "controller"
            if ns.command == "fuse-keeper":
                # beside the engine's container, on the socket the engine looks for in the shared state dir
                assert not ns.socket and ns.idle_exit == 0
                continue
            tls_dir = "/etc/flashcopy/tls" if multi else ""
            listen = f"10.244.1.7:{values['engine']['port']}" if multi else ""
            if ns.command == "serve":
                assert ns.driver_name == values["driverName"]
                assert ns.endpoint == f"unix://{SOCKET}"
                if ns.mode == "controller":
                    assert ns.max_volumes_per_node == 0  # NodeGetInfo's, not served here
                    assert (ns.engine, ns.tls_dir, ns.namespace) == ("cluster", tls_dir, pm.NAMESPACE), name
                else:
                    assert ns.node_id == "node-1"
                    assert ns.max_volumes_per_node == values["maxVolumesPerNode"]
                    # without the engine container, serve hands the engine its TCP listener
                    own_engine = not values["engine"]["separateContainer"]
                    assert ns.engine_listen == (listen if own_engine else ""), name
                    assert ns.tls_dir == (tls_dir if own_engine else ""), name
                    # the engine's Leases (multi-node), or the operations loop beside the controller (--mode all)
                    assert ns.namespace == (pm.NAMESPACE if (own_engine and multi) or ns.mode == "all" else ""), name
                    assert ns.operations == ("auto" if ns.mode == "all" and values["operations"]["enabled"]
                                             else "off" if ns.mode == "all" else "auto"), name
            else:  # the engine container
                assert (ns.listen, ns.tls_dir, ns.node_id) == (listen, tls_dir, "node-1" if multi else ns.node_id)
                assert ns.namespace == (pm.NAMESPACE if multi else ""), name
                assert ns.kubeconfig == ""  # in-cluster config
            for var, e in env.items():
                # every variable the manifests set is one the CLI reads or one the args expand
                assert f'"{var}"' in cli_source or var in referenced, f"{name}: {var} is unused"
                assert "fieldRef" in e["valueFrom"], f"{name}: {var} is not from the downward API"
            want = {"POD_IP": "status.podIP", "NODE_NAME": "spec.nodeName", "POD_NAMESPACE": "metadata.namespace"}
            for var, e in env.items():
                assert e["valueFrom"]["fieldRef"]["fieldPath"] == want[var], f"{name}: {var}"
    assert seen == {("serve", "all"), ("serve", "node"), ("serve", "controller"), ("engine", ""), ("fuse-keeper", ""),
                    ("doctor", "")}


def test_one_driver_name_everywhere(renders: dict[str, list[pm.Obj]], kustomized: dict[str, list[pm.Obj]]) -> None:
    assert pm.chart_values()["driverName"] == csi_driver.DRIVER_NAME
    for name, objs, values in all_renders(renders, kustomized):
        driver = values["driverName"]
        found: list[str] = []
        found += [o["metadata"]["name"] for o in pm.of_kind(objs, "CSIDriver")]
        found += [o["provisioner"] for o in pm.of_kind(objs, "StorageClass")]
        found += [o["driver"] for o in objs if o["kind"] in ("VolumeSnapshotClass", "VolumeGroupSnapshotClass")]
        for _, spec, c in pm.containers(objs):
            v = pm.flag_value(c.get("args", []), "--driver-name")
            if v is not None:
                found.append(v)
            reg = pm.flag_value(c.get("args", []), "--kubelet-registration-path")
            if reg is not None:
                found.append(Path(reg).parent.name)
            for vol in spec["volumes"]:
                if vol["name"] == "socket-dir" and "hostPath" in vol:
                    found.append(Path(vol["hostPath"]["path"]).name)
        assert found and set(found) == {driver}, f"{name}: {found}"
    # Users meet the name in the docs and NOTES too.
    assert csi_driver.DRIVER_NAME in (pm.REPO / "docs" / "install.md").read_text()


def test_sockets_and_paths_meet(renders: dict[str, list[pm.Obj]], kustomized: dict[str, list[pm.Obj]],
                                smd_renders: dict[str, list[pm.Obj]]) -> None:
    for name, objs, values in all_renders(renders, kustomized, smd_renders):
        kubelet = values["kubeletDir"]
        for w, spec in pm.pod_specs(objs):
            vols = {v["name"]: v for v in spec["volumes"]}
            engine_endpoints = {}
            for c in spec["containers"]:
                args = c.get("args", [])
                mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
                if "socket-dir" in mounts:
                    assert mounts["socket-dir"]["mountPath"] == "/csi", f"{name} {c['name']}"
                addr = pm.flag_value(args, "--csi-address")
                if addr is not None:
                    assert addr == SOCKET and "socket-dir" in mounts, f"{name} {c['name']}"
                if pm.is_driver_container(c) and args[0] == "fuse-keeper":
                    # its socket is <state-dir>/fuse-keeper.sock: the engine's state dir, mounted at the same path
                    assert pm.flag_value(args, "--state-dir") == values["stateDir"]
                    assert mounts["state-dir"]["mountPath"] == values["stateDir"], f"{name} {c['name']}"
                    continue
                if pm.is_driver_container(c):
                    if args[0] == "serve":
                        assert pm.flag_value(args, "--endpoint") == f"unix://{SOCKET}" and "socket-dir" in mounts
                    ep = pm.flag_value(args, "--engine-endpoint" if args[0] == "serve" else "--endpoint")
                    if ep:
                        engine_endpoints[c["name"]] = ep
                        # the engine socket lies in the state dir, which both containers mount at the same path
                        assert ep == f"unix://{values['stateDir']}/engine.sock"
                        assert mounts["state-dir"]["mountPath"] == values["stateDir"]
                    if w["kind"] == "DaemonSet":
                        assert c["securityContext"]["privileged"] is True
                        assert mounts["state-dir"]["mountPropagation"] == "Bidirectional"
                        if args[0] == "serve":
                            assert pm.flag_value(args, "--state-dir") == values["stateDir"]
                            assert mounts["kubelet-dir"]["mountPath"] == kubelet
                            assert mounts["kubelet-dir"]["mountPropagation"] == "Bidirectional"
                            assert {"dev-dir", "sys-dir"} <= set(mounts)
                reg = pm.flag_value(args, "--kubelet-registration-path")
                if reg is not None:
                    plugin_dir = vols["socket-dir"]["hostPath"]["path"]
                    assert plugin_dir == f"{kubelet}/plugins/{values['driverName']}"
                    assert reg == f"{plugin_dir}/csi.sock"
                    assert mounts["registration-dir"]["mountPath"] == "/registration"
                    assert vols["registration-dir"]["hostPath"]["path"] == f"{kubelet}/plugins_registry"
            if values["engine"]["separateContainer"] and w["kind"] == "DaemonSet":
                assert len(set(engine_endpoints.values())) == 1 and len(engine_endpoints) == 2, engine_endpoints
            if w["kind"] == "DaemonSet":
                assert vols["state-dir"]["hostPath"]["path"] == values["stateDir"]
            else:
                assert vols["socket-dir"] == {"name": "socket-dir", "emptyDir": {}}


def test_probes_and_ports(renders: dict[str, list[pm.Obj]], kustomized: dict[str, list[pm.Obj]],
                          smd_renders: dict[str, list[pm.Obj]]) -> None:
    for name, objs, _ in all_renders(renders, kustomized, smd_renders):
        for w, spec in pm.pod_specs(objs):
            pod_ports = [p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])]
            assert len(pod_ports) == len(set(pod_ports)), f"{name} {w['kind']}: port clash {pod_ports}"
            health = None
            for c in spec["containers"]:
                ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
                assert all(len(p) <= 15 for p in ports)
                probe = c.get("livenessProbe")
                if probe:
                    assert probe["httpGet"]["port"] in ports, f"{name} {c['name']}: probe port not declared"
                endpoint = pm.flag_value(c.get("args", []), "--http-endpoint")
                if endpoint is not None and probe:
                    assert int(endpoint.rsplit(":", 1)[1]) == ports[probe["httpGet"]["port"]]
                if pm.is_driver_container(c) and probe:
                    health = ports[probe["httpGet"]["port"]]
            # the driver container's /healthz is served by the livenessprobe sidecar
            (lp,) = [c for c in spec["containers"] if c["name"] == "liveness-probe"]
            assert pm.flag_value(lp["args"], "--http-endpoint") == f":{health}"


def test_images_pinned(renders: dict[str, list[pm.Obj]], kustomized: dict[str, list[pm.Obj]],
                       smd_renders: dict[str, list[pm.Obj]]) -> None:
    app_version = (pm.CHART / "Chart.yaml").read_text().split('appVersion: "')[1].split('"')[0]
    for name, objs, values in all_renders(renders, kustomized, smd_renders):
        for _, _, c in pm.containers(objs):
            image = c["image"]
            m = re.fullmatch(PINNED_IMAGE, image)
            assert m, f"{name}: {image} is not pinned by tag"
            assert m.group(2) != "latest"
            base = pm.image_name(image)
            if base in SIDECAR_TAGS:
                assert image == f"registry.k8s.io/sig-storage/{base}:{SIDECAR_TAGS[base]}", f"{name}: {image}"
            else:
                assert base == "csi-flashcopy"
                if not values["image"]["tag"]:
                    assert image.endswith(f":{app_version}")
        if name in ("chart:defaults", "kustomize:base"):
            assert {c["imagePullPolicy"] for _, _, c in pm.containers(objs)} == {"IfNotPresent"}
    for example, objs in pm.examples().items():
        for o in objs:
            for c in o.get("spec", {}).get("containers", []):
                assert re.search(r":[0-9][A-Za-z0-9_.-]*$", c["image"]), f"{example}: {c['image']}"


def test_required_sidecar_settings(renders: dict[str, list[pm.Obj]], kustomized: dict[str, list[pm.Obj]],
                                   smd_renders: dict[str, list[pm.Obj]]) -> None:
    for name, objs, values in all_renders(renders, kustomized, smd_renders):
        sidecars = {c["name"]: c["args"] for _, _, c in pm.containers(objs)}
        assert {"--feature-gates=Topology=true", "--extra-create-metadata"} <= set(sidecars["csi-provisioner"])
        assert "--feature-gates=CSIVolumeGroupSnapshot=true" in sidecars["csi-snapshotter"]
        le = values["leaderElection"]["enabled"]
        for s in ("csi-provisioner", "csi-snapshotter", "csi-resizer"):
            assert f"--leader-election={str(le).lower()}" in sidecars[s], name
        prov = next(c for _, _, c in pm.containers(objs) if c["name"] == "csi-provisioner")
        capacity = {"--enable-capacity", "--capacity-ownerref-level=2"}
        if values["topology"] == "multi-node":
            # capacity tracking: the owner chain starts at this pod (POD_NAME, NAMESPACE from the downward API)
            assert capacity <= set(prov["args"]), name
            env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in prov["env"]}
            assert env == {"POD_NAME": "metadata.name", "NAMESPACE": "metadata.namespace"}, name
            (csidriver,) = pm.of_kind(objs, "CSIDriver")
            assert csidriver["spec"]["storageCapacity"] is True
        else:
            assert not capacity & set(prov["args"]) and "env" not in prov, name
            (csidriver,) = pm.of_kind(objs, "CSIDriver")
            assert "storageCapacity" not in csidriver["spec"]


# sidecar -> the directory of its peer binary (<name>.xz)
PEER_BINARIES = {
    "csi-provisioner": pm.PEER_K8S / "bin",
    "csi-snapshotter": pm.PEER_K8S / "bin",
    "csi-resizer": pm.PEER_K8S / "bin",
    "csi-snapshot-metadata": pm.PEER_SNAPSHOT_METADATA / "bin",
}


def _peer_sidecar(binary: str, tmp: Path) -> Path | None:
    xz = PEER_BINARIES[binary] / f"{binary}.xz"
    if not xz.exists():
        return None
    exe = tmp / binary
    if not exe.exists():
        with lzma.open(xz) as f:
            exe.write_bytes(f.read())
        os.chmod(exe, 0o755)
    return exe


def test_sidecar_flags_exist(renders: dict[str, list[pm.Obj]], kustomized: dict[str, list[pm.Obj]],
                             smd_renders: dict[str, list[pm.Obj]], tmp_path_factory: pytest.TempPathFactory) -> None:
    """The real provisioner/snapshotter/resizer/snapshot-metadata binaries parse the manifests' args (flags, values
    and feature-gate names; `--version` makes them exit right after parsing); registrar and livenessprobe flags come
    from a table."""
    tmp = tmp_path_factory.mktemp("sidecars")
    peers = {b: _peer_sidecar(b, tmp) for b in PEER_BINARIES}
    checked: set[tuple[str, ...]] = set()
    for name, objs, _ in all_renders(renders, kustomized, smd_renders):
        for _, _, c in pm.containers(objs):
            base = pm.image_name(c["image"])
            if base in KNOWN_FLAGS:
                for a in c["args"]:
                    flag = a.lstrip("-").split("=", 1)[0]
                    assert flag in KNOWN_FLAGS[base], f"{name}: {base} has no flag --{flag}"
            exe = peers.get(base)
            if exe is None or tuple(c["args"]) in checked:
                continue
            r = subprocess.run([str(exe), *c["args"], "--version"], capture_output=True, text=True)
            assert r.returncode == 0 and SIDECAR_TAGS[base] in r.stdout, f"{name}: {base}: {r.stderr[-800:]}"
            checked.add(tuple(c["args"]))
    missing = sorted(b for b, exe in peers.items() if exe is None)
    if missing:
        pytest.skip(f"registrar/livenessprobe checked; no {missing} binaries under "
                    f"{sorted({str(PEER_BINARIES[b]) for b in missing})}")


def test_rbac_least_privilege_wiring(renders: dict[str, list[pm.Obj]], kustomized: dict[str, list[pm.Obj]],
                                     smd_renders: dict[str, list[pm.Obj]]) -> None:
    for name, objs, values in all_renders(renders, kustomized, smd_renders):
        sas = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in pm.of_kind(objs, "ServiceAccount")}
        roles = {o["metadata"]["name"]: o for o in pm.of_kind(objs, "ClusterRole") + pm.of_kind(objs, "Role")}
        for r in roles.values():
            for rule in r["rules"]:
                for field in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[field], f"{name}: wildcard in {r['metadata']['name']}"
                assert "secrets" not in rule["resources"], f"{name}: {r['metadata']['name']} reads secrets"
        bound: dict[tuple[str, str], set[str]] = {}
        for b in pm.of_kind(objs, "ClusterRoleBinding") + pm.of_kind(objs, "RoleBinding"):
            assert b["roleRef"]["name"] in roles
            for s in b["subjects"]:
                assert (s["namespace"], s["name"]) in sas, f"{name}: binding to unknown SA {s}"
                bound.setdefault((s["namespace"], s["name"]), set()).add(b["roleRef"]["name"])
        for w, spec in pm.pod_specs(objs):
            sa = (w["metadata"]["namespace"], spec["serviceAccountName"])
            assert sa in sas
            names = {c["name"] for c in spec["containers"]}
            wanted = {f"{pm.RELEASE}-{s}" for s in ("provisioner", "snapshotter", "resizer") if f"csi-{s}" in names}
            if wanted and values["leaderElection"]["enabled"]:
                wanted.add(f"{pm.RELEASE}-leader-election")
            if values["topology"] == "multi-node":
                # the engines write their Lease; the controller reads them and keeps CSIStorageCapacity objects
                wanted |= ({f"{pm.RELEASE}-engine-lease-writer"} if w["kind"] == "DaemonSet" else
                           {f"{pm.RELEASE}-engine-lease-reader", f"{pm.RELEASE}-provisioner-capacity"})
            serves_controller = (w["kind"] == "Deployment") == (values["topology"] == "multi-node")
            if serves_controller and values["operations"]["enabled"]:
                wanted.add(f"{pm.RELEASE}-operations")  # VolumeRestore/VolumeRefresh, FlashCopyNode, Events
            if "csi-snapshot-metadata" in names:
                wanted.add(f"{pm.RELEASE}-snapshot-metadata")  # TokenReview, SubjectAccessReview, snapshots
            assert bound.get(sa, set()) == wanted, f"{name} {w['kind']}: {sa} bound to {bound.get(sa)}"
            # a pod without sidecars talking to the API server gets no token
            assert spec.get("automountServiceAccountToken", True) == bool(wanted)
        if f"{pm.RELEASE}-snapshotter" in roles:
            rules = roles[f"{pm.RELEASE}-snapshotter"]["rules"]
            group = {res for r in rules if "groupsnapshot.storage.k8s.io" in r["apiGroups"] for res in r["resources"]}
            assert group == {"volumegroupsnapshotclasses", "volumegroupsnapshotcontents",
                             "volumegroupsnapshotcontents/status"}


def test_examples_use_the_chart_classes() -> None:
    values = pm.chart_values()
    sc, vsc, vgsc = (values[k]["name"] for k in ("storageClass", "volumeSnapshotClass", "volumeGroupSnapshotClass"))
    seen = set()
    for example, objs in pm.examples().items():
        for o in objs:
            spec = o.get("spec", {})
            if o["kind"] == "PersistentVolumeClaim":
                assert spec["storageClassName"] == sc, example
                seen.add("pvc")
                if spec.get("dataSource", {}).get("kind") == "VolumeSnapshot":
                    seen.add("restore")
                if spec.get("dataSource", {}).get("kind") == "PersistentVolumeClaim":
                    seen.add("clone")
            elif o["kind"] == "VolumeSnapshot":
                assert spec["volumeSnapshotClassName"] == vsc
                seen.add("snapshot")
            elif o["kind"] == "VolumeGroupSnapshot":
                assert spec["volumeGroupSnapshotClassName"] == vgsc
                assert spec["source"]["selector"]["matchLabels"]
                seen.add("group")
    assert seen == {"pvc", "restore", "clone", "snapshot", "group"}
    # restore-group.sh prints PVCs with the source PVC's class
    assert (pm.EXAMPLES / "restore-group.sh").stat().st_mode & 0o111
