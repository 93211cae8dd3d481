#!/usr/bin/env python3
"""Creates a Kakehashi support session from call-center software, in Python.

Needs only grpcio and protobuf (Debian: python3-grpcio python3-protobuf) and message
classes generated from the wire contract with protoc, no grpc-tools:

    protoc -I proto/proto --python_out=gen proto/proto/kakehashi/v1/kakehashi.proto
    PYTHONPATH=gen KAKEHASHI_API_KEY=kh_... \
        python3 ops/examples/python/create_session.py --coordinator 127.0.0.1:7700

Prints one JSON object: the session id, the code the operator reads to the customer,
the operator ticket the operator's viewer joins with, and the granted deadline. On a
gRPC error it prints {"error": CODE_NAME, "message": ...} and exits with status 2 (so
a wrong key shows {"error": "UNAUTHENTICATED", ...}).
"""

import argparse
import json
import os
import sys

import grpc
from kakehashi.v1 import kakehashi_pb2 as pb

SERVICE = "/kakehashi.v1.SessionService/"


def session_stub(channel):
    """The SessionService methods this example uses, written by hand: each is a
    unary-unary call with the generated request and response classes."""
    create = channel.unary_unary(
        SERVICE + "CreateSession",
        request_serializer=pb.CreateSessionRequest.SerializeToString,
        response_deserializer=pb.CreateSessionResponse.FromString,
    )
    end = channel.unary_unary(
        SERVICE + "EndSession",
        request_serializer=pb.EndSessionRequest.SerializeToString,
        response_deserializer=pb.Session.FromString,
    )
    return create, end


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator's gRPC port")
    parser.add_argument("--api-key", default=os.environ.get("KAKEHASHI_API_KEY", ""),
                        help="kh_<key_id>_<secret>; default $KAKEHASHI_API_KEY")
    parser.add_argument("--tenant", default="", help="empty: the key's own tenant")
    parser.add_argument("--operator", default="", help="empty: the key's name")
    parser.add_argument("--mode", choices=["view", "control"], default="control")
    parser.add_argument("--max-duration-secs", type=int, default=0)
    parser.add_argument("--end", action="store_true", help="end the session again right away")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    args = parser.parse_args()

    # Plain text for a loopback or in-cluster coordinator; use
    # grpc.secure_channel(addr, grpc.ssl_channel_credentials()) behind a TLS ingress.
    with grpc.insecure_channel(args.coordinator) as channel:
        create, end = session_stub(channel)
        metadata = [("authorization", "Bearer " + args.api_key)]
        mode = pb.SESSION_MODE_CONTROL if args.mode == "control" else pb.SESSION_MODE_VIEW
        try:
            created = create(
                pb.CreateSessionRequest(
                    tenant=args.tenant,
                    operator=args.operator,
                    mode=mode,
                    max_duration_secs=args.max_duration_secs,
                ),
                metadata=metadata,
                timeout=args.timeout,
            )
            out = {
                "session_id": created.session.session_id,
                "tenant": created.session.tenant,
                "operator": created.session.operator,
                "code": created.code,
                "operator_ticket": created.operator_ticket,
                "deadline_unix_ms": created.session.deadline_unix_ms,
            }
            if args.end:
                ended = end(
                    pb.EndSessionRequest(session_id=created.session.session_id, detail="example done"),
                    metadata=metadata,
                    timeout=args.timeout,
                )
                out["ended_state"] = pb.SessionState.Name(ended.state)
        except grpc.RpcError as e:
            print(json.dumps({"error": e.code().name, "message": e.details()}))
            return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
