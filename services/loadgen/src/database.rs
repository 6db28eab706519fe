//! The run's stores: a file in a temporary directory (SQLite, the default), or a fresh PostgreSQL database created
//! through the URL given with `--database-url` and dropped at the end, so runs never collide or leave state behind.
//!
//! A PostgreSQL database is dropped by [`FreshDatabase::drop_database`] on the normal path; if the run ends early (an
//! error, a panic, Ctrl-C) its `Drop` does it instead, with `WITH (FORCE)` so that replicas still connected do not
//! keep it alive.

use anyhow::{Context, Result, bail};
use reqwest::Url;
use sqlx::Connection;
use uuid::Uuid;

/// Where the run's databases live.
pub enum Backend {
    /// Files in a directory removed at the end of the run.
    Sqlite { dir: tempfile::TempDir },
    /// Databases created next to the one `admin_url` names (which is only used to create and drop them).
    Postgres { admin_url: Url },
}

impl Backend {
    /// SQLite in a temporary directory without a URL; PostgreSQL with a `postgres://` or `postgresql://` URL.
    pub fn new(database_url: Option<&str>) -> Result<Backend> {
        let Some(url) = database_url else {
            return Ok(Backend::Sqlite {
                dir: tempfile::tempdir()?,
            });
        };
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            bail!(
                "--database-url must be a PostgreSQL URL (postgres://USER@HOST:PORT/DATABASE); \
                 without it the loadgen uses a temporary SQLite file"
            );
        }
        let admin_url = Url::parse(url).context("--database-url is not a valid URL")?;
        Ok(Backend::Postgres { admin_url })
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Backend::Postgres { .. })
    }

    /// What the run stores into, for the report (the password, if any, hidden).
    pub fn describe(&self) -> String {
        match self {
            Backend::Sqlite { .. } => {
                "SQLite, a fresh file per store in a temporary directory".to_owned()
            }
            Backend::Postgres { admin_url } => {
                let mut shown = admin_url.clone();
                if shown.password().is_some() {
                    let _ = shown.set_password(Some("***"));
                }
                format!(
                    "PostgreSQL, a fresh database per store created through {shown} and dropped at the end"
                )
            }
        }
    }

    /// A new, empty database named after `label` (a short lowercase word).
    pub async fn fresh(&self, label: &str) -> Result<FreshDatabase> {
        match self {
            Backend::Sqlite { dir } => Ok(FreshDatabase {
                url: format!(
                    "sqlite://{}",
                    dir.path().join(format!("{label}.db")).display()
                ),
                postgres: None,
            }),
            Backend::Postgres { admin_url } => {
                let name = format!("loadgen_{label}_{}", Uuid::new_v4().simple());
                let mut connection = sqlx::PgConnection::connect(admin_url.as_str())
                    .await
                    .context("connecting to PostgreSQL with --database-url")?;
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut connection)
                    .await
                    .with_context(|| {
                        format!(
                            "creating database {name}: the user in --database-url needs the CREATEDB privilege"
                        )
                    })?;
                let _ = connection.close().await;
                let mut url = admin_url.clone();
                url.set_path(&format!("/{name}"));
                Ok(FreshDatabase {
                    url: url.to_string(),
                    postgres: Some(Created {
                        admin_url: admin_url.to_string(),
                        name,
                    }),
                })
            }
        }
    }
}

struct Created {
    admin_url: String,
    name: String,
}

/// One store's database; a PostgreSQL one is dropped when this is.
pub struct FreshDatabase {
    /// The URL the aggregator and the loadgen's own store use.
    pub url: String,
    /// Set while a PostgreSQL database exists that this run created.
    postgres: Option<Created>,
}

impl FreshDatabase {
    /// Drops a PostgreSQL database now (stop the replicas first); nothing for SQLite, whose directory goes at the end.
    pub async fn drop_database(mut self) -> Result<()> {
        match self.postgres.take() {
            Some(created) => drop_postgres(&created).await,
            None => Ok(()),
        }
    }
}

async fn drop_postgres(created: &Created) -> Result<()> {
    let mut connection = sqlx::PgConnection::connect(&created.admin_url).await?;
    sqlx::query(&format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        created.name
    ))
    .execute(&mut connection)
    .await
    .with_context(|| format!("dropping database {}", created.name))?;
    let _ = connection.close().await;
    Ok(())
}

impl Drop for FreshDatabase {
    fn drop(&mut self) {
        let Some(created) = self.postgres.take() else {
            return;
        };
        // Drop may run inside the async runtime (a task ending with an error): do the async work on a thread of its
        // own with a runtime of its own, and wait for it.
        let outcome = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(drop_postgres(&created)).map_err(|err| {
                anyhow::anyhow!(
                    "{err:#}; drop it by hand: DROP DATABASE {} WITH (FORCE)",
                    created.name
                )
            })
        })
        .join();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("license-sync-loadgen: {err:#}"),
            Err(_) => eprintln!("license-sync-loadgen: dropping the run's database panicked"),
        }
    }
}
