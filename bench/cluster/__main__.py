"""`python -m bench.cluster up`: start a local cluster (replicas behind nginx, private PostgreSQL and
Redis, a mock upstream), print where it is, and keep it up until Ctrl-C or --for seconds."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any

from bench.cluster.cluster import ADMIN_KEY, Cluster, ClusterSpec
from bench.cluster.faults import fault_spec
from bench.cluster.services import ServiceError


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a cluster and keep it running")
    up.add_argument("--replicas", type=int, default=3)
    up.add_argument("--ledger", choices=["private", "shared", "sqlite"], default="private",
                    help="private: a throwaway PostgreSQL; shared: a fresh database on 127.0.0.1:5432")
    up.add_argument("--faults", action="store_true", help="also the faulty upstreams and models of the fault tests")
    up.add_argument("--for", dest="for_s", type=float, default=0.0, help="stop after this many seconds (0: Ctrl-C)")
    up.add_argument("--keep", action="store_true", help="keep the working directory (configs, logs) afterwards")
    up.add_argument("--json", action="store_true", help="print the endpoints as one JSON line")
    a = p.parse_args(argv)
    if a.replicas < 1:
        p.error("--replicas must be at least 1")
    return a


def describe(c: Cluster) -> dict[str, Any]:
    return {"url": c.url, "admin_key": ADMIN_KEY, "replicas": [r.url for r in c.replicas],
            "ledger": c.ledger_url, "state": c.state_url, "mocks": {k: v[1] for k, v in c.mocks.items()},
            "workdir": str(c.root)}


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    spec = fault_spec(a.replicas) if a.faults else ClusterSpec(replicas=a.replicas)
    spec.ledger, spec.keep = a.ledger, a.keep
    c = Cluster(spec)
    stopping = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        c.start()
    except ServiceError as e:
        c.stop()
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        info = describe(c)
        if a.json:
            print(json.dumps(info), flush=True)
        else:
            print(f"margin cluster: {a.replicas} replicas behind nginx at {info['url']}/v1", flush=True)
            for k, v in info.items():
                print(f"  {k}: {v}", flush=True)
            print("Ctrl-C stops everything.", flush=True)
        deadline = time.monotonic() + a.for_s if a.for_s > 0 else None
        while not stopping and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.2)
    finally:
        c.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
