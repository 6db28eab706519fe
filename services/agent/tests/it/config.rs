//! Loading and validating the configuration. Every test runs in a figment `Jail` (own working directory, serialised
//! environment) because the configuration reads `LICENSE_SYNC_AGENT_*` variables.

// `Jail::expect_with` dictates the closure's `figment::Error` result type.
#![allow(clippy::result_large_err)]

use std::path::Path;
use std::time::Duration;

use figment::Jail;
use license_sync_agent::config::{AgentConfig, ConfigError, SourceConfig};

const SERVER_ID: &str = "6f1c8a38-5b2e-4a4f-9d44-8d4a4f1b6c01";

fn problems(error: &ConfigError) -> Vec<(String, String)> {
    error
        .problems()
        .iter()
        .map(|problem| (problem.key.clone(), problem.message.clone()))
        .collect()
}

fn load(jail: &Jail, toml: &str) -> Result<AgentConfig, ConfigError> {
    jail.create_file("agent.toml", toml).expect("write config");
    AgentConfig::load(Path::new("agent.toml"))
}

#[test]
fn a_complete_file_loads_and_relative_paths_follow_the_file() {
    Jail::expect_with(|jail| {
        jail.create_dir("conf")?;
        jail.create_file("conf/token", "t0ken\n")?;
        jail.create_file("conf/credential", "lsi_abc\n")?;
        jail.create_file(
            "conf/agent.toml",
            &format!(
                r#"
                [instance]
                server_id = "{SERVER_ID}"
                hostname = "ghes-1.example.com"

                [source]
                kind = "ghes"
                url = "https://ghes.example.com"
                username = "site-admin"
                token_file = "token"
                poll_initial_ms = 500

                [aggregator]
                endpoint = "http://127.0.0.1:50051"
                credential_file = "credential"
                "#
            ),
        )?;
        let config = AgentConfig::load(Path::new("conf/agent.toml")).expect("valid config");
        let SourceConfig::Ghes(ghes) = &config.source else {
            panic!("expected a GHES source");
        };
        let token_file = ghes.token_file.as_ref().expect("token_file");
        assert!(token_file.is_absolute(), "{token_file:?}");
        assert!(token_file.ends_with("conf/token"), "{token_file:?}");
        assert_eq!(ghes.token().expect("token").expose_secret(), "t0ken");
        assert_eq!(ghes.poll_initial, Duration::from_millis(500));
        assert_eq!(ghes.poll_max, Duration::from_millis(30_000));
        assert_eq!(ghes.request_timeout, Duration::from_secs(30));
        assert_eq!(ghes.report_deadline, Duration::from_secs(600));
        let aggregator = config.aggregator().expect("aggregator");
        assert_eq!(aggregator.batch_size, 1000);
        assert_eq!(
            aggregator.credential().expect("credential").expose_secret(),
            "lsi_abc"
        );
        // Secrets never show in Debug.
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("lsi_abc") && !debug.contains("t0ken"),
            "{debug}"
        );
        Ok(())
    });
}

#[test]
fn environment_variables_override_the_file() {
    Jail::expect_with(|jail| {
        jail.set_env(
            "LICENSE_SYNC_AGENT_AGGREGATOR__ENDPOINT",
            "https://agg.example.com:8443",
        );
        jail.set_env("LICENSE_SYNC_AGENT_AGGREGATOR__CREDENTIAL", "lsi_from_env");
        jail.set_env("LICENSE_SYNC_AGENT_INSTANCE__GHES_VERSION", "3.14");
        jail.set_env("LICENSE_SYNC_AGENT_AGGREGATOR__BATCH_SIZE", "250");
        // Not a config key (no `__`): the CLI's own variable must not be refused as unknown.
        jail.set_env("LICENSE_SYNC_AGENT_CONFIG", "agent.toml");
        let config = load(
            jail,
            &format!(
                r#"
                [instance]
                server_id = "{SERVER_ID}"
                hostname = "ghes-1.example.com"
                [source]
                kind = "file"
                path = "all_users.csv"
                [aggregator]
                endpoint = "http://127.0.0.1:50051"
                "#
            ),
        )
        .expect("valid config");
        let aggregator = config.aggregator().expect("aggregator");
        assert_eq!(
            aggregator.endpoint.as_str(),
            "https://agg.example.com:8443/"
        );
        assert_eq!(aggregator.batch_size, 250);
        assert_eq!(
            aggregator.credential().expect("credential").expose_secret(),
            "lsi_from_env"
        );
        assert_eq!(config.instance.ghes_version.as_deref(), Some("3.14"));
        let SourceConfig::File(file) = &config.source else {
            panic!("expected a file source");
        };
        assert!(file.path.is_absolute() && file.path.ends_with("all_users.csv"));
        Ok(())
    });
}

#[test]
fn missing_server_id_names_the_key_and_its_variable() {
    Jail::expect_with(|jail| {
        let error = load(
            jail,
            r#"
            [instance]
            hostname = "ghes-1.example.com"
            [source]
            kind = "file"
            path = "all_users.csv"
            "#,
        )
        .expect_err("server_id is required");
        let problems = problems(&error);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].0, "instance.server_id");
        assert!(
            problems[0]
                .1
                .contains("LICENSE_SYNC_AGENT_INSTANCE__SERVER_ID"),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .contains("`instance.server_id` is missing"),
            "{error}"
        );
        Ok(())
    });
}

#[test]
fn invalid_server_id_and_unknown_keys_are_reported_with_their_key() {
    Jail::expect_with(|jail| {
        let error = load(
            jail,
            r#"
            [instance]
            server_id = "not-a-uuid"
            hostname = "ghes-1.example.com"
            [source]
            kind = "file"
            path = "all_users.csv"
            "#,
        )
        .expect_err("bad uuid");
        assert_eq!(problems(&error)[0].0, "instance.server_id", "{error}");

        let error = load(
            jail,
            &format!(
                r#"
                [instance]
                server_id = "{SERVER_ID}"
                hostname = "ghes-1.example.com"
                [source]
                kind = "file"
                path = "all_users.csv"
                tokne = "typo"
                "#
            ),
        )
        .expect_err("unknown key");
        assert_eq!(problems(&error)[0].0, "source.tokne", "{error}");

        let error = load(
            jail,
            &format!(
                r#"
                [instance]
                server_id = "{SERVER_ID}"
                hostname = "ghes-1.example.com"
                [source]
                kind = "ftp"
                "#
            ),
        )
        .expect_err("unknown kind");
        assert!(error.to_string().contains("file, ghes"), "{error}");
        Ok(())
    });
}

#[test]
fn token_and_token_file_together_are_refused() {
    Jail::expect_with(|jail| {
        jail.create_file("token", "t")?;
        let error = load(
            jail,
            &format!(
                r#"
                [instance]
                server_id = "{SERVER_ID}"
                hostname = "ghes-1.example.com"
                [source]
                kind = "ghes"
                url = "https://ghes.example.com"
                username = "site-admin"
                token = "inline"
                token_file = "token"
                "#
            ),
        )
        .expect_err("both secrets");
        let problems = problems(&error);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].0, "source.token");
        assert!(problems[0].1.contains("source.token_file"), "{error}");
        assert!(problems[0].1.contains("keep only one"), "{error}");
        assert!(
            !error.to_string().contains("inline"),
            "the secret leaked: {error}"
        );
        Ok(())
    });
}

#[test]
fn bad_urls_and_settings_are_all_reported_at_once() {
    Jail::expect_with(|jail| {
        let error = load(
            jail,
            r#"
                [instance]
                server_id = "00000000-0000-0000-0000-000000000000"
                hostname = "https://ghes-1.example.com"
                [source]
                kind = "ghes"
                url = "ftp://ghes.example.com"
                username = ""
                token_file = "missing-token"
                poll_initial_ms = 5000
                poll_max_ms = 1000
                max_attempts = 0
                [aggregator]
                endpoint = "http://127.0.0.1:50051"
                credential = "lsi_x"
                ca_cert = "ca.pem"
                client_cert = "client.pem"
                batch_size = 0
                "#,
        )
        .expect_err("many problems");
        let keys: Vec<String> = problems(&error).into_iter().map(|(key, _)| key).collect();
        for expected in [
            "instance.server_id",
            "instance.hostname",
            "source.url",
            "source.username",
            "source.token_file",
            "source.poll_max_ms",
            "source.max_attempts",
            "aggregator.ca_cert",
            // A client certificate needs its key, an https endpoint and an existing file.
            "aggregator.client_key",
            "aggregator.client_cert",
            "aggregator.batch_size",
        ] {
            assert!(
                keys.iter().any(|key| key == expected),
                "{expected} missing in {keys:?}"
            );
        }

        let error = load(
            jail,
            &format!(
                r#"
                [instance]
                server_id = "{SERVER_ID}"
                hostname = "ghes-1.example.com"
                [source]
                kind = "ghes"
                url = "not a url"
                username = "site-admin"
                token = "t"
                "#
            ),
        )
        .expect_err("unparsable URL");
        let problems = problems(&error);
        assert_eq!(problems[0].0, "source.url", "{error}");
        assert!(problems[0].1.contains("not a url"), "{error}");
        Ok(())
    });
}

#[test]
fn missing_secrets_say_where_to_put_them() {
    Jail::expect_with(|jail| {
        let error = load(
            jail,
            &format!(
                r#"
                [instance]
                server_id = "{SERVER_ID}"
                hostname = "ghes-1.example.com"
                [source]
                kind = "ghes"
                url = "https://ghes.example.com"
                username = "site-admin"
                [aggregator]
                endpoint = "http://127.0.0.1:50051"
                "#
            ),
        )
        .expect_err("no secrets");
        let text = error.to_string();
        assert!(text.contains("site_admin"), "{text}");
        assert!(text.contains("LICENSE_SYNC_AGENT_SOURCE__TOKEN"), "{text}");
        assert!(
            text.contains("LICENSE_SYNC_AGENT_AGGREGATOR__CREDENTIAL"),
            "{text}"
        );
        Ok(())
    });
}

#[test]
fn a_missing_config_file_is_an_error_not_an_empty_config() {
    Jail::expect_with(|_jail| {
        let error = AgentConfig::load(Path::new("nope.toml")).expect_err("missing file");
        assert!(matches!(error, ConfigError::Unreadable { .. }), "{error:?}");
        assert!(error.to_string().contains("nope.toml"), "{error}");
        Ok(())
    });
}

#[test]
fn the_aggregator_section_is_only_required_to_sync() {
    Jail::expect_with(|jail| {
        let config = load(
            jail,
            &format!(
                r#"
                [instance]
                server_id = "{SERVER_ID}"
                hostname = "ghes-1.example.com"
                [source]
                kind = "file"
                path = "all_users.csv"
                "#
            ),
        )
        .expect("valid without aggregator");
        let error = config.aggregator().expect_err("sync needs it");
        assert!(error.to_string().contains("[aggregator]"), "{error}");
        Ok(())
    });
}

#[test]
fn the_example_config_is_valid() {
    Jail::expect_with(|jail| {
        jail.set_env("LICENSE_SYNC_AGENT_SOURCE__TOKEN", "t");
        jail.set_env("LICENSE_SYNC_AGENT_AGGREGATOR__CREDENTIAL", "lsi_x");
        jail.set_env(
            "LICENSE_SYNC_AGENT_AGENT__OWNER_TOKEN",
            "owner-token-0123456789abcdef",
        );
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/agent.example.toml");
        let text = std::fs::read_to_string(&example).expect("example config");
        // The example uses absolute secret paths; replace them with the environment variables set above.
        let text: String = text
            .lines()
            .filter(|line| {
                !line.starts_with("token_file")
                    && !line.starts_with("credential_file")
                    && !line.starts_with("owner_token_file")
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let config = load(jail, &text).expect("example is valid");
        assert!(matches!(config.source, SourceConfig::Ghes(_)));
        let agent = config.sidecar().expect("[agent]");
        assert_eq!(agent.sync_interval, Duration::from_secs(604_800));
        assert_eq!(agent.sync_jitter, Duration::from_secs(3_600));
        assert_eq!(agent.listen.to_string(), "127.0.0.1:8091");
        Ok(())
    });
}

const AGENT_BASE: &str = r#"
[instance]
server_id = "6f1c8a38-5b2e-4a4f-9d44-8d4a4f1b6c01"
hostname = "ghes-1.example.com"
[source]
kind = "file"
path = "all_users.csv"
[aggregator]
endpoint = "http://127.0.0.1:50051"
"#;

#[test]
fn the_agent_section_has_production_defaults_and_resolves_paths() {
    Jail::expect_with(|jail| {
        jail.create_dir("conf")?;
        jail.create_file("conf/owner", "owner-token-0123456789abcdef\n")?;
        jail.create_file(
            "conf/agent.toml",
            &format!("{AGENT_BASE}[agent]\nstate_dir = \"state\"\nowner_token_file = \"owner\"\n"),
        )?;
        let config = AgentConfig::load(Path::new("conf/agent.toml")).expect("valid");
        let agent = config.sidecar().expect("[agent]");
        assert!(agent.state_dir.is_absolute() && agent.state_dir.ends_with("conf/state"));
        assert_eq!(agent.listen.to_string(), "127.0.0.1:8091");
        assert_eq!(agent.sync_interval, Duration::from_secs(604_800));
        assert_eq!(agent.sync_jitter, Duration::from_secs(3_600));
        assert_eq!(agent.retry_initial, Duration::from_millis(1_000));
        assert_eq!(agent.retry_max, Duration::from_millis(300_000));
        assert_eq!(agent.shutdown_grace, Duration::from_secs(20));
        assert_eq!(
            agent.owner_token().expect("owner token").expose_secret(),
            "owner-token-0123456789abcdef"
        );
        // With a state directory the [aggregator] credential is optional (enrollment provides it).
        assert!(!config.aggregator().expect("aggregator").has_credential());
        Ok(())
    });
}

#[test]
fn agent_settings_are_validated_together() {
    Jail::expect_with(|jail| {
        let error = load(
            jail,
            &format!(
                "{AGENT_BASE}[agent]\nstate_dir = \"state\"\nowner_token = \"short\"\nsync_interval_secs = 10\n\
                 sync_jitter_secs = 10\nretry_initial_ms = 500\nretry_max_ms = 100\nlisten = \"localhost\"\n"
            ),
        )
        .expect_err("invalid");
        let text = error.to_string();
        assert!(text.contains("agent.listen"), "{text}");
        // The listen address fails extraction; fix it and see the remaining problems together.
        let error = load(
            jail,
            &format!(
                "{AGENT_BASE}[agent]\nstate_dir = \"state\"\nowner_token = \"short\"\nsync_interval_secs = 10\n\
                 sync_jitter_secs = 10\nretry_initial_ms = 500\nretry_max_ms = 100\n"
            ),
        )
        .expect_err("invalid");
        let keys: Vec<String> = problems(&error).into_iter().map(|(key, _)| key).collect();
        assert!(keys.contains(&"agent.owner_token".to_owned()), "{keys:?}");
        assert!(
            keys.contains(&"agent.sync_jitter_secs".to_owned()),
            "{keys:?}"
        );
        assert!(keys.contains(&"agent.retry_max_ms".to_owned()), "{keys:?}");
        assert!(
            !error.to_string().contains("\"short\""),
            "the token is echoed: {error}"
        );

        let error = load(
            jail,
            &format!("{AGENT_BASE}[agent]\nstate_dir = \"state\"\n"),
        )
        .expect_err("no owner token");
        assert!(
            error
                .to_string()
                .contains("LICENSE_SYNC_AGENT_AGENT__OWNER_TOKEN"),
            "{error}"
        );
        let error = load(
            jail,
            &format!(
                "{AGENT_BASE}[agent]\nstate_dir = \"state\"\nowner_token = \"owner-token-0123456789abcdef\"\n\
                 sync_interval_secs = 0\n"
            ),
        )
        .expect_err("zero interval");
        assert!(
            error.to_string().contains("agent.sync_interval_secs"),
            "{error}"
        );
        Ok(())
    });
}

#[test]
fn without_an_agent_section_the_aggregator_credential_stays_required() {
    Jail::expect_with(|jail| {
        let error = load(jail, AGENT_BASE).expect_err("no credential");
        assert!(
            error.to_string().contains("aggregator.credential_file"),
            "{error}"
        );
        jail.set_env("LICENSE_SYNC_AGENT_AGENT__STATE_DIR", "state");
        jail.set_env(
            "LICENSE_SYNC_AGENT_AGENT__OWNER_TOKEN",
            "owner-token-0123456789abcdef",
        );
        jail.set_env("LICENSE_SYNC_AGENT_AGENT__SYNC_INTERVAL_SECS", "2");
        jail.set_env("LICENSE_SYNC_AGENT_AGENT__SYNC_JITTER_SECS", "1");
        jail.set_env("LICENSE_SYNC_AGENT_AGENT__LISTEN", "127.0.0.1:0");
        let config = load(jail, AGENT_BASE).expect("the [agent] section from the environment");
        let agent = config.sidecar().expect("[agent]");
        assert_eq!(agent.sync_interval, Duration::from_secs(2));
        assert_eq!(agent.listen.port(), 0);
        Ok(())
    });
}

#[test]
fn duration_keys_keep_their_unit_and_refuse_other_spellings() {
    Jail::expect_with(|jail| {
        jail.set_env("LICENSE_SYNC_AGENT_AGENT__RETRY_MAX_MS", "1500");
        let config = load(
            jail,
            &format!(
                "{AGENT_BASE}timeout_secs = 7\n[agent]\nstate_dir = \"state\"\n\
                 owner_token = \"owner-token-0123456789abcdef\"\nsync_interval_secs = 90\nsync_jitter_secs = 0\n\
                 retry_initial_ms = 250\nshutdown_grace_secs = 3\n"
            ),
        )
        .expect("valid");
        let agent = config.sidecar().expect("[agent]");
        assert_eq!(agent.sync_interval, Duration::from_secs(90));
        assert_eq!(agent.sync_jitter, Duration::ZERO);
        assert_eq!(agent.retry_initial, Duration::from_millis(250));
        assert_eq!(agent.retry_max, Duration::from_millis(1_500));
        assert_eq!(agent.shutdown_grace, Duration::from_secs(3));
        assert_eq!(
            config.aggregator().expect("aggregator").timeout,
            Duration::from_secs(7)
        );

        // The key names the unit: a humantime string or a negative number is refused, naming the key.
        let error = load(
            jail,
            &format!(
                "{AGENT_BASE}timeout_secs = -1\n[agent]\nstate_dir = \"state\"\n\
                 owner_token = \"owner-token-0123456789abcdef\"\nsync_interval_secs = \"1h\"\n"
            ),
        )
        .expect_err("not integers");
        let keys: Vec<String> = problems(&error).into_iter().map(|(key, _)| key).collect();
        assert!(
            keys.contains(&"agent.sync_interval_secs".to_owned()),
            "{keys:?}"
        );
        assert!(
            keys.contains(&"aggregator.timeout_secs".to_owned()),
            "{keys:?}"
        );
        Ok(())
    });
}
