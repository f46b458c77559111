"""`csi-flashcopy doctor`: cli may not import the data path (docs/architecture.md), so the command is run from
here; the checks are csi_driver.datapath.doctor."""

from __future__ import annotations

import argparse
import os
import sys

from csi_driver.datapath import doctor


def run_doctor(args: argparse.Namespace) -> int:
    """Print the report (a table or JSON) on stdout; 1 when a must-have is missing, unless --exit-zero (the node
    pod's init container only logs it: a node that cannot work is refused by its own containers, with reasons)."""
    report = doctor.run(args.state_dir, args.kubelet_dir, path=os.environ.get("PATH"))
    sys.stdout.write(report.to_json() + "\n" if args.output == "json" else report.table())
    sys.stdout.flush()
    return 0 if report.ok or args.exit_zero else 1
