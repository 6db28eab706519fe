//! The failed-authentication limit: refused credentials are counted per client address in fixed one-minute windows,
//! and once an address has more than `auth_failures_per_minute` in its window, its further refusals are answered
//! `Throttled` (HTTP 429 / gRPC `RESOURCE_EXHAUSTED`, with `Retry-After`) until the window ends. Only refusals
//! count and only refusals are throttled: a valid credential is always checked and always let in, even from an
//! address that is throttled (a NAT or an ingress can put an honest agent behind the same address as a scanner).
//! Memory is bounded: at most `auth_failure_tracked_addresses` windows are kept.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::error::ServiceError;
use crate::metrics::{AuthSurface, Metrics};

/// The window failures are counted in.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

struct Window {
    started: Instant,
    failures: AtomicU32,
}

/// Shared by REST, enrollment and the instance-credential check; cheap to clone (clones share the counts).
#[derive(Clone)]
pub struct FailedAuthLimiter {
    windows: moka::sync::Cache<IpAddr, Arc<Window>>,
    allowed_per_window: u32,
    metrics: Arc<Metrics>,
}

impl FailedAuthLimiter {
    pub fn new(allowed_per_window: u32, max_tracked_addresses: u64, metrics: Arc<Metrics>) -> Self {
        FailedAuthLimiter {
            windows: moka::sync::Cache::builder()
                .max_capacity(max_tracked_addresses)
                // From the window's first failure: the entry, and its count, go when the window ends.
                .time_to_live(FAILURE_WINDOW)
                .build(),
            allowed_per_window,
            metrics,
        }
    }

    /// Counts a refused credential from `client` and returns the error to answer: `refusal` itself, or `Throttled`
    /// when the address is over its limit. Without an address (a transport that does not say) the refusal is counted
    /// in the metric but never throttled: one shared bucket would throttle every such client at once.
    pub fn refused(
        &self,
        client: Option<IpAddr>,
        surface: AuthSurface,
        refusal: ServiceError,
    ) -> ServiceError {
        let Some(client) = client else {
            self.metrics.auth_failed(surface, false);
            return refusal;
        };
        let window = self.windows.get_with(client, || {
            Arc::new(Window {
                started: Instant::now(),
                failures: AtomicU32::new(0),
            })
        });
        let failures = window
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let throttled = failures > self.allowed_per_window;
        self.metrics.auth_failed(surface, throttled);
        if !throttled {
            return refusal;
        }
        let retry_after = FAILURE_WINDOW
            .saturating_sub(window.started.elapsed())
            .max(Duration::from_secs(1));
        if failures == self.allowed_per_window.saturating_add(1) {
            // Once per window and address; the address itself is not logged (it identifies a person).
            tracing::warn!(
                surface = surface.as_str(),
                failures,
                "too many refused credentials from one address; its refusals are throttled until its window ends"
            );
        }
        ServiceError::throttled(
            format!(
                "too many failed authentications from this address ({failures} in the last minute, more than the \
                 {} allowed): retry after {} s with a valid credential",
                self.allowed_per_window,
                retry_after.as_secs().max(1)
            ),
            retry_after,
        )
    }
}

/// The TCP peer of a gRPC call (behind an ingress or proxy, the ingress's address). tonic's own `remote_addr()`
/// is asked first; the limited listener of `license_sync_serve::grpc` puts its connection info in the extensions.
pub fn grpc_client_address<T>(request: &tonic::Request<T>) -> Option<IpAddr> {
    request
        .remote_addr()
        .or_else(|| {
            request
                .extensions()
                .get::<license_sync_serve::grpc::GrpcConnection>()
                .and_then(|connection| connection.tcp.remote_addr())
        })
        .map(|peer| peer.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn refusals_past_the_limit_are_throttled_per_address() {
        let limiter = FailedAuthLimiter::new(3, 100, Arc::new(Metrics::for_served_services()));
        let one: IpAddr = [192, 0, 2, 1].into();
        let other: IpAddr = [192, 0, 2, 2].into();
        let refuse = |client| {
            limiter
                .refused(
                    client,
                    AuthSurface::Rest,
                    ServiceError::unauthenticated("Bad credentials"),
                )
                .kind
        };
        for _ in 0..3 {
            assert_eq!(refuse(Some(one)), ErrorKind::Unauthenticated);
        }
        assert_eq!(refuse(Some(one)), ErrorKind::Throttled);
        assert_eq!(refuse(Some(other)), ErrorKind::Unauthenticated);
        // No address: counted, never throttled.
        for _ in 0..10 {
            assert_eq!(refuse(None), ErrorKind::Unauthenticated);
        }
        let throttled = limiter.refused(
            Some(one),
            AuthSurface::Rest,
            ServiceError::unauthenticated("Bad credentials"),
        );
        let retry_after = throttled.retry_after.expect("retry after");
        assert!(retry_after <= FAILURE_WINDOW && retry_after >= Duration::from_secs(1));
    }
}
