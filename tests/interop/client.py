"""A gRPC client that is not tokenbroker's own: Python grpcio, with stubs
generated from proto/ when it runs, drives a running broker through
register, get, watch and delete, and reads the google.rpc error details of
failing calls. Run by tests/interop.rs; prints one "ok ..." line per check.

Usage: client.py --broker 127.0.0.1:PORT --idp http://127.0.0.1:PORT --proto DIR
"""

import argparse
import importlib
import importlib.resources
import json
import sys
import tempfile
import urllib.request

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from grpc_tools import protoc

CALL_TIMEOUT = 10  # seconds; every call is bounded


def generate_stubs(proto_dir, out_dir):
    """Compiles proto/tokenbroker/v1/broker.proto into out_dir (grpc_tools
    brings the well-known types such as google/protobuf/duration.proto)."""
    include = importlib.resources.files("grpc_tools") / "_proto"
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            "tokenbroker/v1/broker.proto",
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed with {code}")
    sys.path.insert(0, out_dir)
    pb = importlib.import_module("tokenbroker.v1.broker_pb2")
    rpc = importlib.import_module("tokenbroker.v1.broker_pb2_grpc")
    return pb, rpc


def dev_login(idp, username):
    """The dev IdP's admin login: the tokens of a new 1FA/2FA login."""
    request = urllib.request.Request(
        f"{idp}/admin/login",
        data=json.dumps({"username": username}).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=CALL_TIMEOUT) as answer:
        return json.load(answer)


def details(error):
    """The ErrorInfo and BadRequest of a failed call (google.rpc.Status in
    the grpc-status-details-bin trailer)."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no google.rpc.Status details on {error.code()}: {error.details()}"
    assert status.code == error.code().value[0], (status.code, error.code())
    info, bad_request = None, None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
    assert info is not None, f"no ErrorInfo in {status}"
    return info, bad_request


def expect_failure(call, code, reason):
    try:
        call()
    except grpc.RpcError as error:
        assert error.code() == code, (error.code(), error.details())
        info, bad_request = details(error)
        assert info.domain == "tokenbroker.v1", info
        assert info.reason == reason, info
        return info, bad_request
    raise AssertionError(f"the call succeeded; expected {code} {reason}")


def check(name):
    print(f"ok {name}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--idp", required=True)
    parser.add_argument("--proto", required=True)
    args = parser.parse_args()

    out = tempfile.mkdtemp(prefix="tokenbroker-stubs-")
    pb, rpc = generate_stubs(args.proto, out)
    check(f"stubs generated from {args.proto} with grpcio {grpc.__version__}")

    with grpc.insecure_channel(args.broker) as channel:
        grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT)
        broker = rpc.TokenBrokerStub(channel)

        # Register: the broker validates the refresh token with one refresh.
        login = dev_login(args.idp, "python")
        registered = broker.RegisterSession(
            pb.RegisterSessionRequest(
                session_id="interop/python",
                refresh_token=login["refresh_token"],
                labels={"client": "grpcio"},
            ),
            timeout=CALL_TIMEOUT,
        )
        assert registered.created
        assert registered.session.state == pb.SESSION_STATE_ACTIVE, registered
        assert registered.session.generation == 1, registered
        assert registered.session.labels["client"] == "grpcio"
        check("RegisterSession")

        # Get: a Bearer token with its expiry and generation.
        got = broker.GetAccessToken(
            pb.GetAccessTokenRequest(session_id="interop/python"), timeout=CALL_TIMEOUT
        ).token
        assert got.token_type == "Bearer", got.token_type
        assert got.access_token.count(".") == 2, "a JWT"
        assert got.generation == 1
        assert got.expires_at.seconds > 0
        check("GetAccessToken")

        # Watch: the current token at once; a forced refresh arrives as the
        # next generation; a deletion ends the stream with DELETED.
        stream = broker.WatchToken(
            pb.WatchTokenRequest(session_id="interop/python"), timeout=3 * CALL_TIMEOUT
        )
        first = next(stream)
        assert first.WhichOneof("event") == "token", first
        assert first.token.access_token == got.access_token
        forced = broker.GetAccessToken(
            pb.GetAccessTokenRequest(session_id="interop/python", force_refresh=True),
            timeout=CALL_TIMEOUT,
        ).token
        assert forced.generation == 2, forced.generation
        update = next(stream)
        assert update.WhichOneof("event") == "token", update
        assert update.token.generation == 2
        assert update.token.access_token == forced.access_token
        check("WatchToken: the current token, then the refreshed one")

        session = broker.GetSession(
            pb.GetSessionRequest(session_id="interop/python"), timeout=CALL_TIMEOUT
        ).session
        assert session.generation == 2 and session.HasField("last_refresh_at"), session
        check("GetSession")

        deleted = broker.DeleteSession(
            pb.DeleteSessionRequest(session_id="interop/python"), timeout=CALL_TIMEOUT
        )
        assert deleted.logged_out_upstream
        ended = next(stream)
        assert ended.WhichOneof("event") == "ended", ended
        assert ended.ended.reason == pb.SessionEnded.DELETED, ended
        assert next(stream, None) is None, "the stream closes after the end event"
        check("WatchToken: the end event after DeleteSession")

        # Failing calls carry google.rpc details: ErrorInfo (and BadRequest).
        expect_failure(
            lambda: broker.GetAccessToken(
                pb.GetAccessTokenRequest(session_id="interop/python"), timeout=CALL_TIMEOUT
            ),
            grpc.StatusCode.NOT_FOUND,
            "SESSION_NOT_FOUND",
        )
        check("NOT_FOUND with ErrorInfo SESSION_NOT_FOUND")
        _, bad_request = expect_failure(
            lambda: broker.RegisterSession(
                pb.RegisterSessionRequest(session_id="interop/empty"), timeout=CALL_TIMEOUT
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )
        assert bad_request is not None, "a BadRequest detail"
        assert bad_request.field_violations[0].field == "refresh_token", bad_request
        check("INVALID_ARGUMENT with ErrorInfo and BadRequest naming refresh_token")

    print("interop: all checks passed", flush=True)


if __name__ == "__main__":
    main()
