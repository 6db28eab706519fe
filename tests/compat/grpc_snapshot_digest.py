"""Streams a snapshot to a license-sync aggregator from Python, with a digest computed from the .proto's text alone.

Usage: grpc_snapshot_digest.py PROTO_DIR STUBS_DIR TARGET SERVER_ID
  PROTO_DIR  the repository's proto/ directory
  STUBS_DIR  an empty directory for the Python stubs generated here with grpcio-tools
  TARGET     the aggregator's gRPC address, host:port (plain text)
  SERVER_ID  the instance's server id; its credential is read from $LICENSE_SYNC_TEST_CREDENTIAL
Prints one JSON object: the receipt of the snapshot, the digest sent, and the answer to the same snapshot sent again
with one bit of its digest flipped (which the aggregator must refuse).

The digest follows the comment on `SnapshotTrailer.users_sha256` in licensesync/v1/ingest.proto; nothing here is
taken from the Rust implementation.
"""

import hashlib
import json
import os
import struct
import sys
import time
import uuid
from importlib import resources

from grpc_tools import protoc


def generate_stubs(proto_dir: str, stubs_dir: str) -> None:
    well_known = str(resources.files("grpc_tools") / "_proto")
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{well_known}",
            f"--python_out={stubs_dir}",
            f"--grpc_python_out={stubs_dir}",
            "licensesync/v1/ingest.proto",
        ]
    )
    if status != 0:
        sys.exit(f"protoc failed with status {status}")


def text(value: str) -> bytes:
    encoded = value.encode("utf-8")
    return struct.pack("<Q", len(encoded)) + encoded


def timestamp(user, field: str) -> bytes:
    if not user.HasField(field):
        return b"\x00"
    return b"\x01" + struct.pack("<q", getattr(user, field).seconds)


def user_bytes(user, pb) -> bytes:
    role = {pb.USER_ROLE_USER: "user", pb.USER_ROLE_SITE_ADMIN: "site_admin"}[user.role]
    if not user.HasField("two_factor_enabled"):
        two_factor = 0
    else:
        two_factor = 2 if user.two_factor_enabled else 1
    return (
        struct.pack("<q", user.id)
        + text(user.login)
        + text(user.email)
        + text(role)
        + bytes([int(user.suspended), int(user.dormant), two_factor])
        + timestamp(user, "created_at")
        + timestamp(user, "last_active")
    )


def users(pb):
    """Every encoding case of the digest: absent and present optionals, both roles, non-ASCII text, an empty
    email, a time before 1970, nanos that are not hashed."""
    from google.protobuf.timestamp_pb2 import Timestamp as ts

    return [
        pb.ServerUser(id=1, login="mona", email="mona@example.com", role=pb.USER_ROLE_USER),
        pb.ServerUser(
            id=2,
            login="josé",
            email="José@Example.com",
            role=pb.USER_ROLE_SITE_ADMIN,
            two_factor_enabled=True,
            created_at=ts(seconds=1_600_000_000, nanos=123_456_789),
            last_active=ts(seconds=int(time.time()) - 3600),
        ),
        pb.ServerUser(
            id=3,
            login="hubot",
            email="",
            role=pb.USER_ROLE_USER,
            dormant=True,
            two_factor_enabled=False,
            created_at=ts(seconds=-86_400, nanos=5),
        ),
        pb.ServerUser(
            id=4_000_000_000_000,
            login="octocat",
            email="octocat@example.com",
            role=pb.USER_ROLE_USER,
            suspended=True,
            last_active=ts(seconds=0),
        ),
        pb.ServerUser(id=5, login="defunkt", email="defunkt@example.com", role=pb.USER_ROLE_USER),
    ]


def chunks(pb, server_id: str, sent, digest: bytes):
    from google.protobuf.timestamp_pb2 import Timestamp

    generated_at = Timestamp(seconds=int(time.time()) - 60)
    yield pb.SnapshotChunk(
        header=pb.SnapshotHeader(
            sync_id=str(uuid.uuid4()),
            server_id=server_id,
            hostname="python.ghes.test",
            ghes_version="3.14.2",
            generated_at=generated_at,
        )
    )
    # Batches of two: batch boundaries are not part of the digest.
    for start in range(0, len(sent), 2):
        yield pb.SnapshotChunk(users=pb.UserBatch(users=sent[start : start + 2]))
    yield pb.SnapshotChunk(trailer=pb.SnapshotTrailer(user_count=len(sent), users_sha256=digest))


def main() -> None:
    proto_dir, stubs_dir, target, server_id = sys.argv[1:5]
    credential = os.environ["LICENSE_SYNC_TEST_CREDENTIAL"]
    generate_stubs(proto_dir, stubs_dir)
    sys.path.insert(0, stubs_dir)
    import grpc
    from licensesync.v1 import ingest_pb2 as pb
    from licensesync.v1 import ingest_pb2_grpc as pb_grpc

    sent = users(pb)
    digest = hashlib.sha256(b"".join(user_bytes(user, pb) for user in sent)).digest()
    metadata = [("authorization", f"Bearer {credential}")]
    with grpc.insecure_channel(target) as channel:
        ingest = pb_grpc.SnapshotIngestStub(channel)
        receipt = ingest.UploadSnapshot(chunks(pb, server_id, sent, digest), metadata=metadata, timeout=30)
        damaged = bytes([digest[0] ^ 1]) + digest[1:]
        try:
            ingest.UploadSnapshot(chunks(pb, server_id, sent, damaged), metadata=metadata, timeout=30)
            refusal = {"code": "OK", "details": ""}
        except grpc.RpcError as error:
            refusal = {"code": error.code().name, "details": error.details()}
    print(
        json.dumps(
            {
                "users_accepted": receipt.users_accepted,
                "duplicate": receipt.duplicate,
                "server_id": receipt.server_id,
                "users_sha256": digest.hex(),
                "logins": [user.login for user in sent],
                "damaged_digest": refusal,
            }
        )
    )


if __name__ == "__main__":
    main()
