//! Loading: the TOML file merged with the `LICENSE_SYNC_AGENT_*` environment (figment), section by section so that
//! every problem names its full key, and file-relative paths resolved.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format as _, Toml};
use serde::{Deserialize, Deserializer};

use super::{
    AgentConfig, AggregatorConfig, ConfigError, ConfigProblem, ExportConfig, FileSourceConfig,
    GhesSourceConfig, InstanceConfig, SidecarConfig, SourceConfig,
};

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "LICENSE_SYNC_AGENT_";

/// The environment variable that sets a dotted key, for error messages.
pub fn env_var_for(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.replace('.', "__").to_ascii_uppercase()
    )
}

impl AgentConfig {
    /// Loads `path` (TOML) merged with the `LICENSE_SYNC_AGENT_*` environment, then [validates](Self::validate).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        if let Err(source) = std::fs::metadata(path) {
            return Err(ConfigError::Unreadable {
                what: "the configuration file",
                key: "--config",
                path: path.to_owned(),
                source,
            });
        }
        // Absolute, so that file-relative paths stay right whatever the working directory is later.
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        let figment = Figment::from(Toml::file_exact(&path)).merge(
            // Keys without `__` (like LICENSE_SYNC_AGENT_CONFIG, the CLI's) are not configuration keys.
            Env::prefixed(ENV_PREFIX)
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        );
        let config = Self::from_figment(&figment)?;
        config.validate()?;
        Ok(config)
    }

    /// Extracts the configuration from any figment (tests, embedding) and resolves file-relative paths. Does not
    /// validate.
    ///
    /// Sections are extracted one by one (and the source by its `kind`) rather than with one `extract`, because
    /// serde's internally tagged enums lose the key path of errors inside `[source]`: this way every problem names
    /// its full key.
    pub fn from_figment(figment: &Figment) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let top = figment
            .extract::<figment::value::Dict>()
            .map_err(|error| ConfigError::Invalid(figment_problems(error, "")))?;
        for key in top.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                problems.push(ConfigProblem {
                    key: key.clone(),
                    message: format!(
                        "is not a known section; expected one of: {}",
                        SECTIONS.join(", ")
                    ),
                });
            }
        }
        let instance = extract_section::<InstanceConfig>(figment, "instance", &mut problems);
        let source = extract_source(figment, &mut problems);
        let aggregator = if top.contains_key("aggregator") {
            extract_section::<AggregatorConfig>(figment, "aggregator", &mut problems).map(Some)
        } else {
            Some(None)
        };
        let agent = if top.contains_key("agent") {
            extract_section::<SidecarConfig>(figment, "agent", &mut problems).map(Some)
        } else {
            Some(None)
        };
        let export = if top.contains_key("export") {
            extract_section::<ExportConfig>(figment, "export", &mut problems).map(Some)
        } else {
            Some(None)
        };
        match (instance, source, aggregator, agent, export) {
            (Some(instance), Some(source), Some(aggregator), Some(agent), Some(export))
                if problems.is_empty() =>
            {
                let mut config = AgentConfig {
                    instance,
                    source,
                    aggregator,
                    agent,
                    export,
                };
                config.resolve_relative_paths(figment);
                Ok(config)
            }
            _ => Err(ConfigError::Invalid(problems)),
        }
    }

    /// Paths given in a file are relative to that file's directory; others stay relative to the working directory.
    fn resolve_relative_paths(&mut self, figment: &Figment) {
        let resolve = |key: &str, path: &mut PathBuf| {
            if path.is_absolute() {
                return;
            }
            let base = figment
                .find_metadata(key)
                .and_then(|metadata| metadata.source.as_ref())
                .and_then(|source| source.file_path())
                .and_then(Path::parent);
            if let Some(base) = base {
                *path = base.join(&*path);
            }
        };
        match &mut self.source {
            SourceConfig::File(file) => resolve("source.path", &mut file.path),
            SourceConfig::Ghes(ghes) => {
                if let Some(path) = &mut ghes.token_file {
                    resolve("source.token_file", path);
                }
                if let Some(path) = &mut ghes.ca_cert {
                    resolve("source.ca_cert", path);
                }
            }
        }
        if let Some(aggregator) = &mut self.aggregator {
            if let Some(path) = &mut aggregator.credential_file {
                resolve("aggregator.credential_file", path);
            }
            if let Some(path) = &mut aggregator.ca_cert {
                resolve("aggregator.ca_cert", path);
            }
            if let Some(path) = &mut aggregator.client_cert {
                resolve("aggregator.client_cert", path);
            }
            if let Some(path) = &mut aggregator.client_key {
                resolve("aggregator.client_key", path);
            }
        }
        if let Some(agent) = &mut self.agent {
            resolve("agent.state_dir", &mut agent.state_dir);
            if let Some(path) = &mut agent.owner_token_file {
                resolve("agent.owner_token_file", path);
            }
        }
    }
}

const SECTIONS: [&str; 5] = ["instance", "source", "aggregator", "agent", "export"];

fn extract_section<T: serde::de::DeserializeOwned>(
    figment: &Figment,
    section: &str,
    problems: &mut Vec<ConfigProblem>,
) -> Option<T> {
    figment
        .focus(section)
        .extract::<T>()
        .map_err(|error| problems.extend(figment_problems(error, section)))
        .ok()
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum SourceKind {
    File,
    Ghes,
}

/// `[source]` by its `kind`, refusing keys that do not belong to that kind.
fn extract_source(figment: &Figment, problems: &mut Vec<ConfigProblem>) -> Option<SourceConfig> {
    let focused = figment.focus("source");
    let kind = match focused.extract_inner::<SourceKind>("kind") {
        Ok(kind) => kind,
        Err(error) if matches!(error.kind, figment::error::Kind::MissingField(_)) => {
            problems.push(ConfigProblem {
                key: "source.kind".into(),
                message:
                    "is missing: set it to \"ghes\" (live report) or \"file\" (local all_users.csv)"
                        .into(),
            });
            return None;
        }
        Err(error) => {
            problems.extend(figment_problems(error, "source"));
            return None;
        }
    };
    let (kind_name, fields) = match kind {
        SourceKind::File => ("file", struct_fields::<FileSourceConfig>()),
        SourceKind::Ghes => ("ghes", struct_fields::<GhesSourceConfig>()),
    };
    if let Ok(dict) = focused.extract::<figment::value::Dict>() {
        for key in dict.keys() {
            if key != "kind" && !fields.contains(&key.as_str()) {
                problems.push(ConfigProblem {
                    key: format!("source.{key}"),
                    message: format!(
                        "is not a setting of kind = \"{kind_name}\"; expected one of: {}",
                        fields.join(", ")
                    ),
                });
            }
        }
    }
    let result = match kind {
        SourceKind::File => focused.extract().map(SourceConfig::File),
        SourceKind::Ghes => focused.extract().map(SourceConfig::Ghes),
    };
    result
        .map_err(|error| problems.extend(figment_problems(error, "source")))
        .ok()
}

/// The field names serde's derive knows for `T`, so that the list of accepted keys cannot drift from the struct.
fn struct_fields<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Probe(&'static [&'static str]);
    impl<'de> Deserializer<'de> for &mut Probe {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: serde::de::Visitor<'de>>(
            self,
            _: V,
        ) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("field probe"))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            self.0 = fields;
            Err(serde::de::Error::custom("field probe"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut probe = Probe(&[]);
    let _ = T::deserialize(&mut probe);
    probe.0
}

/// Turns figment's errors into problems naming the dotted key (under `prefix`) and where the value came from.
fn figment_problems(error: figment::Error, prefix: &str) -> Vec<ConfigProblem> {
    use figment::error::Kind;
    let join = |parts: &[&str]| {
        parts
            .iter()
            .filter(|part| !part.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(".")
    };
    error
        .into_iter()
        .map(|error| {
            let path = error.path.join(".");
            let mut key = join(&[prefix, &path]);
            let origin = error
                .metadata
                .as_ref()
                .map(|metadata| match metadata.source.as_ref() {
                    Some(source) => format!(" (from {source})"),
                    None => format!(" (from {})", metadata.name),
                })
                .unwrap_or_default();
            let message = match &error.kind {
                Kind::MissingField(field) => {
                    key = join(&[&key, field]);
                    format!(
                        "is missing: set it in the config file or in {}",
                        env_var_for(&key)
                    )
                }
                Kind::UnknownField(field, expected) => {
                    key = join(&[&key, field]);
                    format!(
                        "is not a known setting{origin}; expected one of: {}",
                        expected.join(", ")
                    )
                }
                Kind::UnknownVariant(variant, expected) => format!(
                    "= {variant:?} is not supported{origin}; expected one of: {}",
                    expected.join(", ")
                ),
                other => format!("is invalid{origin}: {other}"),
            };
            ConfigProblem {
                key: if key.is_empty() { "(file)".into() } else { key },
                message,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use figment::providers::Serialized;

    #[test]
    fn env_var_names_follow_the_nesting_rule() {
        assert_eq!(
            env_var_for("aggregator.endpoint"),
            "LICENSE_SYNC_AGENT_AGGREGATOR__ENDPOINT"
        );
    }

    #[test]
    fn lenient_strings_accept_numbers_from_the_environment() {
        let figment = Figment::from(Serialized::defaults(serde_json::json!({
            "instance": { "server_id": "6f1c8a38-5b2e-4a4f-9d44-8d4a4f1b6c01", "hostname": "ghes", "ghes_version": 3.15 },
            "source": { "kind": "ghes", "url": "https://ghes.example.com", "username": 42, "token": 123456 },
        })));
        let config = AgentConfig::from_figment(&figment).expect("extract");
        assert_eq!(config.instance.ghes_version.as_deref(), Some("3.15"));
        let SourceConfig::Ghes(ghes) = &config.source else {
            panic!("ghes source expected");
        };
        assert_eq!(ghes.username, "42");
        assert_eq!(
            ghes.token.as_ref().map(Secret::expose_secret),
            Some("123456")
        );
        assert_eq!(ghes.max_attempts, 5);
        assert!(ghes.read_license);
    }
}
