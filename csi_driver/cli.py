"""The `csi-flashcopy` command: `serve` (the CSI driver), `engine` (the node engine process), `demo`.

Every flag can also come from an environment variable (named in its help), which is how the Kubernetes
manifests pass settings to the containers.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
from collections.abc import Sequence

from csi_driver import DRIVER_NAME, __version__

DEFAULT_STATE_DIR = "/var/lib/csi-flashcopy"


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _seconds(text: str) -> float:
    """A duration flag: a finite number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"seconds must be 0 or more: {text!r}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        default=_env("CSI_FLASHCOPY_STATE_DIR", DEFAULT_STATE_DIR),
        help="directory holding volume data and metadata (env CSI_FLASHCOPY_STATE_DIR)",
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=_env("CSI_LOG_FORMAT", "text"),
        help="log line format (env CSI_LOG_FORMAT)",
    )
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=_env("CSI_LOG_LEVEL", "info"),
        help="log level (env CSI_LOG_LEVEL)",
    )


def _add_cluster(p: argparse.ArgumentParser, *, engine: bool) -> None:
    """Flags of the multi-node install: the engine API over mutual TLS, discovery through Leases."""
    if engine:
        p.add_argument(
            "--listen",
            default=_env("CSI_ENGINE_LISTEN", ""),
            help="also serve the engine API on HOST:PORT for controllers, mutual TLS only (needs --tls-dir; "
            "env CSI_ENGINE_LISTEN; empty = unix socket only)",
        )
        p.add_argument(
            "--node-id",
            default=_env("CSI_NODE_ID", _env("NODE_NAME", socket.gethostname())),
            help="the node this engine serves: the name of its Lease (env CSI_NODE_ID, else NODE_NAME, else "
            "the host name)",
        )
        p.add_argument(
            "--advertise-address",
            default=_env("CSI_ENGINE_ADVERTISE", ""),
            help="HOST:PORT controllers dial, written to the Lease (env CSI_ENGINE_ADVERTISE; default --listen)",
        )
    else:
        p.add_argument(
            "--engine-listen",
            default=_env("CSI_ENGINE_LISTEN", ""),
            help="with --mode node|all: the node engine also serves HOST:PORT for controllers, mutual TLS only "
            "(env CSI_ENGINE_LISTEN; empty = unix socket only)",
        )
    p.add_argument(
        "--tls-dir",
        default=_env("CSI_TLS_DIR", ""),
        help="directory with ca.crt, tls.crt, tls.key: the engine API's mutual TLS (env CSI_TLS_DIR)",
    )
    p.add_argument(
        "--kubeconfig",
        default=_env("CSI_KUBECONFIG", ""),
        help="kubeconfig for the Kubernetes API (env CSI_KUBECONFIG; empty = the in-cluster config)",
    )
    p.add_argument(
        "--namespace",
        default=_env("CSI_NAMESPACE", _env("POD_NAMESPACE", "")),
        help="namespace of the engines' Leases (env CSI_NAMESPACE, else POD_NAMESPACE; empty = no Leases)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csi-flashcopy", description="CSI driver with FlashCopy-style point-in-time copies"
    )
    parser.add_argument("--version", action="version", version=f"csi-flashcopy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the CSI driver (Identity, Controller, GroupController, Node)")
    _add_common(serve)
    serve.add_argument(
        "--endpoint",
        default=_env("CSI_ENDPOINT", "unix:///csi/csi.sock"),
        help="CSI endpoint, unix:///path/to/csi.sock (env CSI_ENDPOINT)",
    )
    serve.add_argument(
        "--node-id",
        default=_env("CSI_NODE_ID", _env("NODE_NAME", socket.gethostname())),
        help="this node's id (env CSI_NODE_ID, else NODE_NAME, else the host name)",
    )
    serve.add_argument(
        "--mode",
        choices=("all", "controller", "node"),
        default=_env("CSI_MODE", "all"),
        help="which CSI services to serve (env CSI_MODE)",
    )
    serve.add_argument(
        "--driver-name",
        default=_env("CSI_DRIVER_NAME", DRIVER_NAME),
        help=f"CSI driver name (env CSI_DRIVER_NAME, default {DRIVER_NAME})",
    )
    serve.add_argument(
        "--engine-endpoint",
        default=_env("CSI_ENGINE_ENDPOINT", ""),
        help="node engine process endpoint, unix:///path (env CSI_ENGINE_ENDPOINT; "
        "default unix://<state-dir>/engine.sock, started when none runs)",
    )
    serve.add_argument(
        "--engine",
        choices=("auto", "embedded", "process", "cluster"),
        default=_env("CSI_ENGINE_MODE", "auto"),
        help="embedded: open the engine in this process; process: use the node engine process; cluster "
        "(--mode controller): every node's engine, found through their Leases, over mutual TLS; auto: cluster "
        "for --mode controller with --tls-dir, process when the node data path is served, else embedded "
        "(env CSI_ENGINE_MODE)",
    )
    serve.add_argument(
        "--keep-engine",
        action="store_true",
        default=_env("CSI_KEEP_ENGINE", "") in ("1", "true", "yes"),
        help="with --engine auto: leave a node engine process this server started running when it stops, so "
        "a restart of the server never interrupts volume I/O (env CSI_KEEP_ENGINE=1); by default it is "
        "stopped with the server",
    )
    serve.add_argument(
        "--max-volumes-per-node",
        type=int,
        default=int(_env("CSI_MAX_VOLUMES_PER_NODE", "0")),
        help="NodeGetInfo max_volumes_per_node, 0 = no limit (env CSI_MAX_VOLUMES_PER_NODE)",
    )
    serve.add_argument(
        "--metrics-address",
        default=_env("CSI_METRICS_ADDRESS", ""),
        help="host:port for Prometheus metrics, empty = off (env CSI_METRICS_ADDRESS)",
    )

    serve.add_argument(
        "--operations",
        choices=("auto", "on", "off"),
        default=_env("CSI_OPERATIONS", "auto"),
        help="reconcile VolumeRestore/VolumeRefresh objects, keep FlashCopyNode status and record Events, on the "
        "leading controller (a Lease); auto: on with --mode controller|all and --namespace when a Kubernetes "
        "API is reachable (env CSI_OPERATIONS)",
    )
    serve.add_argument(
        "--operations-poll",
        type=float,
        default=float(_env("CSI_OPERATIONS_POLL", "2")),
        help="seconds between two passes of the operations loop (env CSI_OPERATIONS_POLL)",
    )
    _add_cluster(serve, engine=False)

    engine = sub.add_parser("engine", help="run the node engine process (volume data, FUSE exports)")
    _add_common(engine)
    _add_cluster(engine, engine=True)
    engine.add_argument(
        "--endpoint",
        default=_env("CSI_ENGINE_ENDPOINT", ""),
        help="engine API endpoint, unix:///path (env CSI_ENGINE_ENDPOINT; default unix://<state-dir>/engine.sock)",
    )
    engine.add_argument(
        "--metrics-address",
        default=_env("CSI_METRICS_ADDRESS", ""),
        help="host:port for Prometheus metrics (/metrics, /healthz) of this engine, empty = off "
        "(env CSI_METRICS_ADDRESS)",
    )
    engine.add_argument(
        "--fuse-keeper",
        choices=("auto", "external", "off"),
        default=_env("CSI_FLASHCOPY_FUSE_KEEPER", "auto"),
        help="who holds the FUSE connection across engine restarts (env CSI_FLASHCOPY_FUSE_KEEPER): auto = a "
        "keeper process this engine starts when none answers; external = the one beside it (the chart's "
        "fuse-keeper container), waited for; off = none, a restart fails the volumes' I/O",
    )
    engine.add_argument(
        "--fuse-keeper-abort-after",
        type=_seconds,
        default=_env("CSI_FLASHCOPY_FUSE_KEEPER_ABORT_AFTER", "120"),
        help="with --fuse-keeper=auto: the keeper this engine starts aborts a FUSE connection no engine process "
        "has taken back within this many seconds, so waiting I/O fails with EIO instead of hanging "
        "(env CSI_FLASHCOPY_FUSE_KEEPER_ABORT_AFTER; default 120; 0: never)",
    )

    certs = sub.add_parser("certs", help="write a CA and the engine API's identities (DIR/controller, DIR/node, "
                           "DIR/nodes/NODE: ca.crt, tls.crt, tls.key each), for installs without the chart's or "
                           "cert-manager's Secrets")
    certs.add_argument("--out", required=True, help="directory to write (created; an existing CA and existing "
                       "files are kept, missing identities added)")
    certs.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    certs.add_argument("--node", action="append", default=[], metavar="NODE",
                       help="also a certificate naming this node only (DIR/nodes/NODE); repeatable")

    keeper = sub.add_parser("fuse-keeper", help="hold /dev/fuse descriptors while the node engine process "
                            "restarts, so its FUSE mounts stay up")
    _add_common(keeper)
    keeper.add_argument("--socket", default="",
                        help="unix socket to serve on, created 0600 (default <state-dir>/fuse-keeper.sock, where "
                             "the engine looks)")
    keeper.add_argument("--idle-exit", type=float, default=30.0,
                        help="exit after holding nothing for this many seconds (default 30; 0: never)")
    keeper.add_argument("--abort-after", type=_seconds,
                        default=_env("CSI_FLASHCOPY_FUSE_KEEPER_ABORT_AFTER", "120"),
                        help="abort a held FUSE connection that no engine process has taken back within this many "
                             "seconds: waiting I/O then fails with EIO instead of hanging the node "
                             "(env CSI_FLASHCOPY_FUSE_KEEPER_ABORT_AFTER; default 120; 0: never)")

    doctor = sub.add_parser("doctor", help="check what the node data path needs on this node (FUSE, loop "
                            "devices, host tools, mount propagation, capabilities, free space); exit 1 when a "
                            "must-have is missing")
    _add_common(doctor)
    doctor.add_argument("--kubelet-dir", default=_env("CSI_KUBELET_DIR", "/var/lib/kubelet"),
                        help="the kubelet's root dir, whose propagation is checked (env CSI_KUBELET_DIR; empty: "
                             "not checked)")
    doctor.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    doctor.add_argument("--exit-zero", action="store_true",
                        help="exit 0 even when a must-have is missing (report only)")

    demo = sub.add_parser("demo", help="a short engine tour on a local state directory")
    demo.add_argument("--state-dir", default=_env("CSI_FLASHCOPY_STATE_DIR", "./state"))

    from csi_driver.k8s.clones import add_clone_parser
    from csi_driver.ops.commands import add_parsers

    add_clone_parser(sub)
    add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from csi_driver.server import run_serve

        return run_serve(args)
    if args.command == "engine":
        from csi_driver.remote.service import run_engine

        return run_engine(args)
    if args.command == "certs":
        from csi_driver.remote.tls import run_certs

        return run_certs(args.out, days=args.days, nodes=args.node)
    if args.command == "fuse-keeper":
        from csi_driver.remote.service import run_fuse_keeper

        return run_fuse_keeper(args)
    if args.command == "doctor":
        from csi_driver.remote.doctor import run_doctor

        return run_doctor(args)
    if args.command == "demo":
        from csi_driver.demo import run_demo

        return run_demo(args.state_dir)
    if args.command == "clone":
        from csi_driver.k8s.clones import run_clone

        return run_clone(args)
    if args.command in ("status", "restore", "refresh"):
        from csi_driver.ops.commands import run

        return run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
