//! REST authentication: an owner's API token (`Authorization: Bearer TOKEN`, or `token TOKEN`, as GitHub accepts)
//! names one enterprise and has a scope. Handlers take [`AuthorizedEnterprise`], which checks the token against the
//! `{enterprise}` path segment and the request's method before the handler runs: a `read` token may make every GET
//! (and HEAD), every other method needs `admin`. The scope is decided by the method, not by a list of routes, so a
//! new write route cannot be left open to read tokens.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRef, FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, header};
use axum::response::{IntoResponse, Response};
use time::OffsetDateTime;

use crate::auth_limit::FailedAuthLimiter;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::metrics::AuthSurface;
use crate::store::{ApiToken, DynStore, Enterprise, TOKEN_LAST_USE_RESOLUTION, TokenScope};
use crate::time_format::rfc3339;
use crate::tokens;

/// Tokens are few (one or a handful per enterprise); this only bounds the memory a flood of distinct valid tokens
/// could take.
const MAX_CACHED_TOKENS: u64 = 10_000;
/// The cache crate refuses lifetimes over 1000 years; any setting this long means "for the process's life".
const MAX_TRUST: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Checks REST API tokens. A valid token is trusted for `api_token_cache_secs` after its check, so a revoked token
/// keeps working on each replica for at most that long; its expiry is checked at every request, cached or not. An
/// invalid token is asked again every time, so a new token works at once. A token's use is written to the store
/// at most once per [`TOKEN_LAST_USE_RESOLUTION`] per process (and the store's statement skips it when another
/// replica wrote within that interval). Cheap to clone: clones share the caches.
#[derive(Clone)]
pub struct ApiTokens {
    store: DynStore,
    /// Enterprise and token by SHA-256 of a checked token; none when `api_token_cache_secs` is 0.
    checked: Option<moka::sync::Cache<String, (Enterprise, ApiToken)>>,
    /// Ids of the tokens whose use this process recorded within the last [`TOKEN_LAST_USE_RESOLUTION`].
    uses_recorded: moka::sync::Cache<i64, ()>,
    limiter: FailedAuthLimiter,
}

/// What a request's token may do in its enterprise.
#[derive(Debug, Clone)]
pub struct Authorized {
    pub enterprise: Enterprise,
    pub token: ApiToken,
}

impl ApiTokens {
    pub fn new(store: DynStore, trust_for: Duration, limiter: FailedAuthLimiter) -> Self {
        let checked = (!trust_for.is_zero()).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(MAX_CACHED_TOKENS)
                .time_to_live(trust_for.min(MAX_TRUST))
                .build()
        });
        let uses_recorded = moka::sync::Cache::builder()
            .max_capacity(MAX_CACHED_TOKENS)
            .time_to_live(
                TOKEN_LAST_USE_RESOLUTION
                    .try_into()
                    .unwrap_or(Duration::from_secs(60)),
            )
            .build();
        ApiTokens {
            store,
            checked,
            uses_recorded,
            limiter,
        }
    }

    /// Resolves a token for an enterprise path segment (slug or numeric id) and a method. A token of another
    /// enterprise gets the same answer as an unknown enterprise, so that enterprises cannot be discovered; a bad or
    /// expired token counts against `client`'s failed-authentication limit.
    pub async fn authorize(
        &self,
        token: &str,
        enterprise: &str,
        method: &Method,
        client: Option<IpAddr>,
    ) -> ServiceResult<Authorized> {
        let (owner, record) = match self.check(token, OffsetDateTime::now_utc(), true).await {
            Ok(checked) => checked,
            Err(refusal) if refusal.kind == ErrorKind::Unauthenticated => {
                return Err(self.limiter.refused(client, AuthSurface::Rest, refusal));
            }
            Err(error) => return Err(error),
        };
        if owner.slug != enterprise && owner.id.to_string() != enterprise {
            return Err(ServiceError::not_found("Not Found"));
        }
        let needed = scope_needed(method);
        if record.scope < needed {
            return Err(ServiceError::permission_denied(format!(
                "this token has the `{}` scope; {method} requests need a token with the `{}` scope \
                 (`license-sync-aggregator token create --scope {}`)",
                record.scope.as_str(),
                needed.as_str(),
                needed.as_str()
            )));
        }
        self.record_use(record.id);
        Ok(Authorized {
            enterprise: owner,
            token: record,
        })
    }

    /// Signs in to the web console with a REST token: its enterprise and record. Asks the store every time (a
    /// sign-in is rare, and a token revoked a moment ago must not open a session that outlives the cache); a bad or
    /// expired token counts against `client`'s failed-authentication limit like a REST request's.
    pub async fn sign_in(&self, token: &str, client: Option<IpAddr>) -> ServiceResult<Authorized> {
        match self.check(token, OffsetDateTime::now_utc(), false).await {
            Ok((enterprise, token)) => {
                self.record_use(token.id);
                Ok(Authorized { enterprise, token })
            }
            Err(refusal) if refusal.kind == ErrorKind::Unauthenticated => {
                Err(self.limiter.refused(client, AuthSurface::Console, refusal))
            }
            Err(error) => Err(error),
        }
    }

    /// The token's enterprise and record, if it is live and unexpired at `now`; from the cache of checked tokens
    /// when `cached` allows it.
    async fn check(
        &self,
        token: &str,
        now: OffsetDateTime,
        cached: bool,
    ) -> ServiceResult<(Enterprise, ApiToken)> {
        let token_sha256 = tokens::sha256_hex(token);
        let cached = self
            .checked
            .as_ref()
            .filter(|_| cached)
            .and_then(|checked| checked.get(&token_sha256));
        let (enterprise, record) = match cached {
            Some(checked) => checked,
            None => {
                let checked = self
                    .store
                    .api_token_by_hash(&token_sha256)
                    .await?
                    .ok_or_else(|| ServiceError::unauthenticated("Bad credentials"))?;
                if let Some(cache) = &self.checked {
                    cache.insert(token_sha256, checked.clone());
                }
                checked
            }
        };
        if let Some(expires_at) = record.expires_at
            && expires_at <= now
        {
            return Err(ServiceError::unauthenticated(format!(
                "Bad credentials: the token {:?} expired at {}; create a new one \
                 (`license-sync-aggregator token create`)",
                record.name,
                rfc3339(expires_at)
            )));
        }
        Ok((enterprise, record))
    }

    /// Writes the token's last use in the background, at most once per interval per process: the request does not
    /// wait for it, and a failed write is only logged (the next interval writes again).
    fn record_use(&self, token_id: i64) {
        let entry = self.uses_recorded.entry(token_id).or_insert(());
        if !entry.is_fresh() {
            return;
        }
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(error) = store
                .record_api_token_use(token_id, OffsetDateTime::now_utc())
                .await
            {
                tracing::warn!(token_id, %error, "cannot record a REST token's last use");
            }
        });
    }
}

/// GET and HEAD read; every other method changes something.
pub fn scope_needed(method: &Method) -> TokenScope {
    if method == Method::GET || method == Method::HEAD {
        TokenScope::Read
    } else {
        TokenScope::Admin
    }
}

/// The TCP peer's address, which the HTTP server puts in each request's extensions (behind an ingress or proxy,
/// the ingress's address).
pub fn client_address(parts: &Parts) -> Option<IpAddr> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| peer.ip())
}

/// The enterprise of the `{enterprise}` path segment, for a request whose token belongs to it and whose scope
/// allows the request's method. Rejected with GitHub's answers: 401 without a token or with a bad or expired one,
/// 404 for an enterprise the token does not belong to, 403 for a `read` token on a change; 429 for an address with
/// too many refused tokens.
#[derive(Debug, Clone)]
pub struct AuthorizedEnterprise(pub Enterprise);

impl<S> FromRequestParts<S> for AuthorizedEnterprise
where
    ApiTokens: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let enterprise = params
            .iter()
            .find_map(|(name, value)| (name == "enterprise").then_some(value))
            .ok_or_else(|| ServiceError::not_found("Not Found").into_response())?;
        let api_tokens = ApiTokens::from_ref(state);
        let client = client_address(parts);
        let token = match request_token(&parts.headers) {
            Ok(Some(token)) => token,
            // No credential at all is not a failed attempt (a first request before the client sends one).
            Ok(None) => {
                return Err(
                    ServiceError::unauthenticated("Requires authentication").into_response()
                );
            }
            Err(refusal) => {
                return Err(api_tokens
                    .limiter
                    .refused(client, AuthSurface::Rest, refusal)
                    .into_response());
            }
        };
        api_tokens
            .authorize(token, enterprise, &parts.method, client)
            .await
            .map(|authorized| AuthorizedEnterprise(authorized.enterprise))
            .map_err(IntoResponse::into_response)
    }
}

/// `Authorization: Bearer TOKEN` or `Authorization: token TOKEN`, as GitHub accepts; `None` without the header.
pub fn request_token(headers: &HeaderMap) -> ServiceResult<Option<&str>> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| ServiceError::unauthenticated("Bad credentials"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| ServiceError::unauthenticated("Bad credentials"))?;
    if scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token") {
        Ok(Some(token.trim()))
    } else {
        Err(ServiceError::unauthenticated(
            "Bad credentials: use `Authorization: Bearer TOKEN`",
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::http::HeaderValue;

    use super::*;
    use crate::admin;
    use crate::metrics::Metrics;
    use crate::store::NewApiToken;

    fn limiter() -> FailedAuthLimiter {
        FailedAuthLimiter::new(1000, 100, Arc::new(Metrics::for_served_services()))
    }

    #[tokio::test]
    async fn a_token_opens_only_its_own_enterprise_with_or_without_the_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("auth.db").display());
        let store = crate::store::open(&url).await.expect("store");
        let acme = admin::create_enterprise(&store, "acme", "Acme", 10)
            .await
            .expect("enterprise");
        admin::create_enterprise(&store, "other", "Other", 10)
            .await
            .expect("enterprise");
        let token = admin::create_api_token(&store, "acme", "test")
            .await
            .expect("token");
        for trust_for in [Duration::ZERO, Duration::from_secs(60)] {
            let tokens = ApiTokens::new(store.clone(), trust_for, limiter());
            let authorize = |token: String, enterprise: String| {
                let tokens = tokens.clone();
                async move {
                    tokens
                        .authorize(&token, &enterprise, &Method::GET, None)
                        .await
                        .map(|authorized| authorized.enterprise)
                }
            };
            // Twice: the second answer may come from the cache.
            for _ in 0..2 {
                assert_eq!(
                    authorize(token.clone(), "acme".into()).await.ok(),
                    Some(acme.clone())
                );
                let by_id = authorize(token.clone(), acme.id.to_string()).await;
                assert_eq!(by_id.ok(), Some(acme.clone()));
                let other = authorize(token.clone(), "other".into())
                    .await
                    .expect_err("other");
                assert_eq!(other.kind, ErrorKind::NotFound);
                let bad = authorize("lst_unknown".into(), "acme".into())
                    .await
                    .expect_err("bad");
                assert_eq!(bad.kind, ErrorKind::Unauthenticated);
            }
        }
    }

    #[tokio::test]
    async fn an_expired_token_is_refused_even_from_the_cache_and_a_read_token_cannot_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("auth.db").display());
        let store = crate::store::open(&url).await.expect("store");
        admin::create_enterprise(&store, "acme", "Acme", 10)
            .await
            .expect("enterprise");
        let now = OffsetDateTime::now_utc();
        let expiring = NewApiToken {
            name: "expiring",
            scope: TokenScope::Read,
            expires_at: Some(now + time::Duration::hours(1)),
        };
        let (_, token) = admin::issue_api_token(&store, "acme", &expiring, now)
            .await
            .expect("token");
        let tokens = ApiTokens::new(store.clone(), Duration::from_secs(300), limiter());
        assert!(tokens.check(&token, now, true).await.is_ok());
        // Cached now; an hour later the cached entry is refused all the same.
        let later = tokens
            .check(&token, now + time::Duration::hours(2), true)
            .await
            .expect_err("expired");
        assert_eq!(later.kind, ErrorKind::Unauthenticated);
        assert!(later.message.contains("expired"), "{}", later.message);
        assert!(!later.message.contains(&token), "{}", later.message);
        let write = tokens
            .authorize(&token, "acme", &Method::POST, None)
            .await
            .expect_err("read token on a write");
        assert_eq!(write.kind, ErrorKind::PermissionDenied);
        assert!(write.message.contains("`admin` scope"), "{}", write.message);
    }

    #[test]
    fn authorization_accepts_bearer_and_token_schemes() {
        let mut headers = HeaderMap::new();
        assert_eq!(request_token(&headers).ok(), Some(None));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(request_token(&headers).ok(), Some(Some("abc")));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("token abc"));
        assert_eq!(request_token(&headers).ok(), Some(Some("abc")));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert!(request_token(&headers).is_err());
    }
}
