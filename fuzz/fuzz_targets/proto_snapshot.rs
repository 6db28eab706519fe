//! What an agent streams: any bytes decoded as a stream chunk, then converted to the domain. Conversion must never
//! panic, and a user that converts is converted back to the same wire message's meaning (domain → wire → domain is
//! the identity), so the aggregator stores what the agent sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use license_sync_proto::convert::{
    server_user, server_user_from_proto, snapshot_header, snapshot_meta_from_proto,
};
use license_sync_proto::v1::SnapshotChunk;
use license_sync_proto::v1::snapshot_chunk::Chunk;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(chunk) = SnapshotChunk::decode(data) else {
        return;
    };
    match chunk.chunk {
        Some(Chunk::Header(header)) => {
            if let Ok(meta) = snapshot_meta_from_proto(header) {
                let again = snapshot_meta_from_proto(snapshot_header(&meta))
                    .expect("a header we wrote converts back");
                assert_eq!(again, meta);
            }
        }
        Some(Chunk::Users(batch)) => {
            for user in batch.users {
                if let Ok(user) = server_user_from_proto(user) {
                    let again =
                        server_user_from_proto(server_user(&user)).expect("a user we wrote converts back");
                    assert_eq!(again, user);
                }
            }
        }
        Some(Chunk::Trailer(_)) | None => {}
    }
});
