//! REST authentication: an owner's API token (`Authorization: Bearer TOKEN`, or `token TOKEN`, as GitHub accepts)
//! names one enterprise. Handlers take [`AuthorizedEnterprise`], which checks the token against the `{enterprise}`
//! path segment before the handler runs.

use std::time::Duration;

use axum::extract::{FromRef, FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};

use crate::error::{ServiceError, ServiceResult};
use crate::store::{DynStore, Enterprise};
use crate::tokens;

/// Tokens are few (one or a handful per enterprise); this only bounds the memory a flood of distinct valid tokens
/// could take.
const MAX_CACHED_TOKENS: u64 = 10_000;
/// The cache crate refuses lifetimes over 1000 years; any setting this long means "for the process's life".
const MAX_TRUST: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Checks REST API tokens. A valid token is trusted for `api_token_cache_secs` after its check (so a revoked token
/// keeps working on this process for at most that long); an invalid one is asked again every time, so a new token
/// works at once. Cheap to clone: clones share the cache.
#[derive(Clone)]
pub struct ApiTokens {
    store: DynStore,
    /// Enterprises by SHA-256 of a checked token; none when `api_token_cache_secs` is 0.
    checked: Option<moka::sync::Cache<String, Enterprise>>,
}

impl ApiTokens {
    pub fn new(store: DynStore, trust_for: Duration) -> Self {
        let checked = (!trust_for.is_zero()).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(MAX_CACHED_TOKENS)
                .time_to_live(trust_for.min(MAX_TRUST))
                .build()
        });
        ApiTokens { store, checked }
    }

    /// Resolves a token for an enterprise path segment (slug or numeric id). A token of another enterprise gets the
    /// same answer as an unknown enterprise, so that enterprises cannot be discovered.
    pub async fn authorize(&self, token: &str, enterprise: &str) -> ServiceResult<Enterprise> {
        let owned = self.enterprise_for_token(token).await?;
        if owned.slug == enterprise || owned.id.to_string() == enterprise {
            Ok(owned)
        } else {
            Err(ServiceError::not_found("Not Found"))
        }
    }

    async fn enterprise_for_token(&self, token: &str) -> ServiceResult<Enterprise> {
        let token_sha256 = tokens::sha256_hex(token);
        if let Some(enterprise) = self
            .checked
            .as_ref()
            .and_then(|checked| checked.get(&token_sha256))
        {
            return Ok(enterprise);
        }
        let enterprise = self
            .store
            .enterprise_for_api_token(&token_sha256)
            .await?
            .ok_or_else(|| ServiceError::unauthenticated("Bad credentials"))?;
        if let Some(checked) = &self.checked {
            checked.insert(token_sha256, enterprise.clone());
        }
        Ok(enterprise)
    }
}

/// The enterprise of the `{enterprise}` path segment, for a request whose token belongs to it. Rejected with
/// GitHub's answers: 401 without a token or with a bad one, 404 for an enterprise the token does not belong to.
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
        let token = request_token(&parts.headers).map_err(IntoResponse::into_response)?;
        ApiTokens::from_ref(state)
            .authorize(token, enterprise)
            .await
            .map(AuthorizedEnterprise)
            .map_err(IntoResponse::into_response)
    }
}

/// `Authorization: Bearer TOKEN` or `Authorization: token TOKEN`, as GitHub accepts.
fn request_token(headers: &HeaderMap) -> ServiceResult<&str> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ServiceError::unauthenticated("Requires authentication"))?
        .to_str()
        .map_err(|_| ServiceError::unauthenticated("Bad credentials"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| ServiceError::unauthenticated("Bad credentials"))?;
    if scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token") {
        Ok(token.trim())
    } else {
        Err(ServiceError::unauthenticated(
            "Bad credentials: use `Authorization: Bearer TOKEN`",
        ))
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;
    use crate::admin;
    use crate::error::ErrorKind;

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
            let tokens = ApiTokens::new(store.clone(), trust_for);
            // Twice: the second answer may come from the cache.
            for _ in 0..2 {
                assert_eq!(
                    tokens.authorize(&token, "acme").await.ok(),
                    Some(acme.clone())
                );
                let by_id = tokens.authorize(&token, &acme.id.to_string()).await;
                assert_eq!(by_id.ok(), Some(acme.clone()));
                let other = tokens.authorize(&token, "other").await.expect_err("other");
                assert_eq!(other.kind, ErrorKind::NotFound);
                let bad = tokens
                    .authorize("lst_unknown", "acme")
                    .await
                    .expect_err("bad");
                assert_eq!(bad.kind, ErrorKind::Unauthenticated);
            }
        }
    }

    #[test]
    fn authorization_accepts_bearer_and_token_schemes() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            request_token(&headers).expect_err("missing").kind,
            ErrorKind::Unauthenticated
        );
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(request_token(&headers).ok(), Some("abc"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("token abc"));
        assert_eq!(request_token(&headers).ok(), Some("abc"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert!(request_token(&headers).is_err());
    }
}
