//! A PostgreSQL database of its own for one test or trial: created next to the database an admin URL names, and
//! dropped (with its connections) when dropped.

use anyhow::{Context, Result};
use sqlx::Connection;
use uuid::Uuid;

/// A database created for one test and dropped afterwards.
pub struct TestDatabase {
    admin_url: String,
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    /// Creates `ls_e2e_<random>` on the server of `admin_url` (`postgres://USER@HOST:PORT/DATABASE`).
    pub async fn create(admin_url: &str) -> Result<TestDatabase> {
        let name = format!("ls_e2e_{}", Uuid::new_v4().simple());
        let mut connection = sqlx::PgConnection::connect(admin_url)
            .await
            .with_context(|| format!("connect to PostgreSQL at {admin_url}"))?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut connection)
            .await
            .context("create database")?;
        let (prefix, _) = admin_url
            .rsplit_once('/')
            .context("the PostgreSQL URL must end with /DATABASE")?;
        Ok(TestDatabase {
            admin_url: admin_url.to_owned(),
            url: format!("{prefix}/{name}"),
            name,
        })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        // A thread of its own: dropping may happen inside a runtime, which cannot block on another.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(mut connection) = sqlx::PgConnection::connect(&url).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut connection)
                        .await;
                }
            });
        })
        .join();
    }
}
