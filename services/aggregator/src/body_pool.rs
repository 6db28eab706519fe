//! Reused buffers for response bodies.
//!
//! A `consumed-licenses` page is 60–80 KB. Allocated fresh for each request, such a buffer is a new run of pages
//! for the allocator, which (told to return freed memory at once, see `license_sync_alloc`) gives them back to the
//! OS when the response is sent: every request then paid for page faults and the kernel zeroing pages, about a tenth
//! of its CPU. A body taken from this pool is handed to hyper as [`Bytes`] that put the buffer back when the last
//! reference is dropped. The pool keeps at most [`POOLED_BODIES`] buffers of at most [`MAX_POOLED_BYTES`] each.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;

const POOLED_BODIES: usize = 32;
const MAX_POOLED_BYTES: usize = 256 * 1024;

#[derive(Default)]
pub struct BodyPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BodyPool {
    /// An empty buffer with room for at least `capacity` bytes.
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        let reused = self.free.lock().ok().and_then(|mut free| free.pop());
        let mut body = reused.unwrap_or_default();
        body.reserve(capacity);
        body
    }

    /// The body as `Bytes` whose buffer returns to this pool once sent (and no longer cached).
    pub fn into_bytes(self: &Arc<Self>, body: Vec<u8>) -> Bytes {
        Bytes::from_owner(PooledBody {
            body,
            pool: Arc::clone(self),
        })
    }

    fn put_back(&self, mut body: Vec<u8>) {
        if body.capacity() > MAX_POOLED_BYTES {
            return;
        }
        body.clear();
        if let Ok(mut free) = self.free.lock()
            && free.len() < POOLED_BODIES
        {
            free.push(body);
        }
    }

    #[cfg(test)]
    fn pooled(&self) -> usize {
        self.free.lock().map(|free| free.len()).unwrap_or_default()
    }
}

struct PooledBody {
    body: Vec<u8>,
    pool: Arc<BodyPool>,
}

impl AsRef<[u8]> for PooledBody {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        self.pool.put_back(std::mem::take(&mut self.body));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_returns_to_the_pool_when_its_last_reference_drops() {
        let pool = Arc::new(BodyPool::default());
        let mut body = pool.take(1000);
        body.extend_from_slice(b"{\"users\":[]}");
        let address = body.as_ptr();
        let bytes = pool.into_bytes(body);
        let cached = bytes.clone();
        assert_eq!(&bytes[..], b"{\"users\":[]}");
        drop(bytes);
        assert_eq!(pool.pooled(), 0, "still referenced by the cache");
        drop(cached);
        assert_eq!(pool.pooled(), 1);
        let again = pool.take(10);
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), address, "the same buffer, reused");
    }

    #[test]
    fn oversized_buffers_are_not_kept() {
        let pool = Arc::new(BodyPool::default());
        drop(pool.into_bytes(Vec::with_capacity(MAX_POOLED_BYTES + 1)));
        assert_eq!(pool.pooled(), 0);
    }
}
