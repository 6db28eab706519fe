//! A client of a running agent's local API, behind the CLI's `status`, `sync-now`, `enable`, `disable`, `jobs` and
//! `connection` commands.

use std::path::Path;
use std::time::Duration;

use reqwest::{Method, Url};
use serde_json::Value;

use crate::config::{ConfigError, ConfigProblem, Secret};
use crate::error::{AgentError, error_chain};

/// The environment variable that may hold the owner token for the CLI.
pub const OWNER_TOKEN_ENV: &str = "LICENSE_SYNC_AGENT_OWNER_TOKEN";

/// A client of `http://…` (the agent's `agent.listen`).
#[derive(Debug, Clone)]
pub struct LocalApiClient {
    base: Url,
    http: reqwest::Client,
    owner_token: Option<Secret>,
}

impl LocalApiClient {
    pub fn new(base: &str, owner_token: Option<Secret>) -> Result<Self, AgentError> {
        let mut base = Url::parse(base.trim()).map_err(|error| {
            AgentError::Config(ConfigError::Invalid(vec![ConfigProblem {
                key: "--api".into(),
                message: format!("= {base:?} is not a URL ({error}): e.g. http://127.0.0.1:8091"),
            }]))
        })?;
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|error| AgentError::Internal(error_chain(&error)))?;
        Ok(LocalApiClient {
            base,
            http,
            owner_token,
        })
    }

    pub async fn get(&self, path: &str) -> Result<Value, AgentError> {
        self.call(Method::GET, path, None, false).await
    }

    /// An owner-only call.
    pub async fn owner(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, AgentError> {
        self.call(method, path, body, true).await
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        owner: bool,
    ) -> Result<Value, AgentError> {
        let url = self
            .base
            .join(path.trim_start_matches('/'))
            .map_err(|error| AgentError::Internal(format!("bad API path {path:?}: {error}")))?;
        let mut request = self.http.request(method, url.clone());
        if owner {
            let token = self.owner_token.as_ref().ok_or_else(|| {
                AgentError::Config(ConfigError::Invalid(vec![ConfigProblem {
                    key: "--owner-token-file".into(),
                    message: format!(
                        "is not set: this action is for the owner; pass --owner-token-file FILE or set \
                         {OWNER_TOKEN_ENV}"
                    ),
                }]))
            })?;
            request = request.bearer_auth(token.expose_secret());
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(|error| AgentError::LocalApiUnreachable {
                url: url.to_string(),
                reason: error_chain(&error),
            })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|error| AgentError::LocalApiUnreachable {
                url: url.to_string(),
                reason: error_chain(&error),
            })?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(value);
        }
        let message = value
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("unexpected answer of {} bytes", text.len()));
        Err(AgentError::LocalApi {
            url: url.to_string(),
            status: status.as_u16(),
            message,
        })
    }
}

/// The owner token for the CLI: `--owner-token-file`, else the environment variable, else none.
pub fn owner_token(file: Option<&Path>) -> Result<Option<Secret>, AgentError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Unreadable {
            what: "the owner token file",
            key: "--owner-token-file",
            path: path.to_owned(),
            source,
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(AgentError::Config(ConfigError::Invalid(vec![
                ConfigProblem {
                    key: "--owner-token-file".into(),
                    message: format!("= {:?} is empty", path.display()),
                },
            ])));
        }
        return Ok(Some(Secret::new(token)));
    }
    Ok(std::env::var(OWNER_TOKEN_ENV)
        .ok()
        .map(|token| token.trim().to_owned())
        .filter(|token| !token.is_empty())
        .map(Secret::new))
}
