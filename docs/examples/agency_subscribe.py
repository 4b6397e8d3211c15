#!/usr/bin/env python3
"""An agency's live subscription to citygw (citygw.v1.Telemetry/Subscribe), in ~60 lines.

The book's walk-through (README.md, docs/src/getting-started.md) runs it, and
tests/e2e/test_walkthrough.py runs it against a real gateway, so it stays true.

    CITYGW_AGENCY_TOKEN=<token> python3 docs/examples/agency_subscribe.py \
        [--server localhost:50051] [--kind air_quality] [--after-id 0] [--count N]

Needs grpcio and grpcio-tools (both in tests/requirements.txt, so in .venv after ./tests/run).
The client code is generated from proto/ at start, into a temporary directory.
"""

import argparse
import os
import pathlib
import sys
import tempfile

import grpc
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_stubs():
    out = tempfile.mkdtemp(prefix="citygw-stubs-")
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto/citygw/v1").glob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}"]
    if protoc.main(args + protos) != 0:
        sys.exit("protoc failed")
    sys.path.insert(0, out)
    from citygw.v1 import telemetry_pb2, telemetry_pb2_grpc  # noqa: E402

    return telemetry_pb2, telemetry_pb2_grpc


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", default="localhost:50051")
    ap.add_argument("--kind", action="append", default=[], help="device kind (repeat); none: the whole scope")
    ap.add_argument("--after-id", type=int, default=0, help="resume after this reading id (0: from the oldest)")
    ap.add_argument("--count", type=int, default=0, help="stop after this many readings (0: run until Ctrl-C)")
    opts = ap.parse_args()
    token = os.environ.get("CITYGW_AGENCY_TOKEN") or sys.exit("set CITYGW_AGENCY_TOKEN")

    t, tg = load_stubs()
    api = tg.TelemetryStub(grpc.insecure_channel(opts.server))
    auth = [("authorization", f"Bearer {token}")]
    last_id, seen = opts.after_id, 0
    while True:
        request = t.SubscribeRequest(filter=t.Filter(kinds=opts.kind), resume=t.ResumePoint(after_id=last_id))
        try:
            for r in api.Subscribe(request, metadata=auth):
                value = r.WhichOneof("value")
                print(r.id, r.device_id, r.quantity, getattr(r, value) if value else "", r.unit, flush=True)
                last_id, seen = r.id, seen + 1  # keep it: a new Subscribe resumes after it
                if opts.count and seen >= opts.count:
                    return
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:  # too slow: resume, lose nothing
                sys.exit(f"{e.code().name}: {e.details()}")


if __name__ == "__main__":
    main()
