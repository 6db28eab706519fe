//! The [`Store`](super::Store) implementation both backends share, written once.
//!
//! Every query is written with `$N` placeholders, which PostgreSQL and SQLite both read the same way (sqlx binds
//! SQLite's `$N` by number), so each statement is one string for both. [`sql_store!`] expands the trait
//! implementation once per backend with the backend's concrete database type: the shared code stays monomorphic
//! (no generic `sqlx::Database` bounds), and it runs exactly the statements it ran before the backends were merged.
//!
//! A backend supplies, as inherent items of its store type, only what really differs:
//! - `pool`: its connection pool;
//! - `write_guard()`: what serialises writers in the process (SQLite's one writer) or a no-op (PostgreSQL locks rows);
//! - `begin_write()`: a write transaction (`BEGIN IMMEDIATE` on SQLite);
//! - `begin_snapshot_read()`: a read transaction over one consistent snapshot;
//! - `insert_users()`, `insert_cloud_members()`: the bulk inserts (multi-row `VALUES` vs `UNNEST`);
//! - `lock_enterprise()`: the enterprise row lock that serialises member imports (none on SQLite);
//! - `bump_users_generation()`: the generation bump of a snapshot commit (one statement on PostgreSQL);
//!
//! and, as arguments of the macro, the SQL words that differ: the row-lock clauses (`FOR UPDATE`, `FOR SHARE`,
//! empty on SQLite, whose writers hold the database lock) and the two-argument maximum (`MAX` vs `GREATEST`).

/// Implements [`Store`](super::Store) for `$store` over the sqlx database `$db` (see the module documentation).
macro_rules! sql_store {
    (
        store: $store:ident,
        database: $db:ty,
        for_update: $for_update:literal,
        for_share: $for_share:literal,
        greatest: $greatest:literal $(,)?
    ) => {
        /// The queries shared with the other backend (`store::shared`).
        mod shared_queries {
            use ::license_sync_core::accounts::Accounts;
            use ::license_sync_core::model::CloudMember;
            use ::sqlx::{FromRow, Row};
            use ::time::OffsetDateTime;
            use ::uuid::Uuid;

            use super::$store;
                        use $crate::store::rows::{
                ACCOUNT_COLUMNS, INSTANCE_COLUMNS, SYNC_REQUEST_COLUMNS, api_token_from_row, collect_accounts,
                collect_cloud_directory, instance_from_row, is_unique_violation, sync_request_from_row,
                usage_day_from_row,
            };
            use $crate::store::{
                AckOutcome, AgentReport, ApiToken, Arrival, CONNECTION_RECORD_RETENTION, CommitOutcome, ConsoleSession,
                NewConsoleSession, TokenScope,
                Enterprise, NewApiToken, TOKEN_LAST_USE_RESOLUTION, TokenSelector, Instance, InstanceVersion, MergeChanges, SYNC_REQUEST_TTL, SnapshotCommit, Store,
                StoreError, StoreResult, SyncAckRecord, SyncRequest, UsageDay, UsageFileKey, WRITE_PROBE_BYTES, time_to_unix_ms,
                unix_ms_to_time,
            };

            type Transaction<'c> = ::sqlx::Transaction<'c, $db>;

            /// The columns `rows::api_token_from_row` decodes: a macro, so that `concat!` joins it into each query.
            macro_rules! api_token_columns {
                () => {
                    "id, enterprise_id, name, scope, created_at, expires_at_ms, last_used_at_ms, revoked_at"
                };
            }

            /// Outcome of the part of a commit that can be retried as a whole.
            enum Attempt {
                Done(CommitOutcome),
                /// Another replica applied the same sync id between our check and our insert (PostgreSQL only:
                /// SQLite's writers run one at a time).
                RacedOnSyncId,
            }

            impl $store {
                async fn try_commit(&self, commit: &SnapshotCommit<'_>) -> StoreResult<Attempt> {
                    let meta = &commit.snapshot.meta;
                    let sync_id = meta.sync_id.to_string();
                    let _write = self.write_guard().await;
                    let mut tx = self.begin_write().await?;

                    // The instance row lock serialises commits of one instance across replicas.
                    let stored = sqlx::query(concat!(
                        "SELECT enterprise_id, generated_at_ms, retired_at, hostname FROM instances WHERE id = $1",
                        $for_update
                    ))
                    .bind(commit.instance_id)
                    .fetch_optional(&mut *tx)
                    .await?
                    .ok_or(StoreError::InstanceGone)?;

                    let applied = sqlx::query(
                        "SELECT instance_id, users_sha256, user_count, committed_at_ms FROM applied_syncs \
                         WHERE sync_id = $1",
                    )
                    .bind(&sync_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                    if let Some(applied) = applied {
                        let instance_id: i64 = applied.try_get("instance_id")?;
                        let sha: String = applied.try_get("users_sha256")?;
                        if instance_id != commit.instance_id || sha != commit.users_sha256 {
                            return Err(StoreError::SyncIdReused { sync_id });
                        }
                        let user_count: i64 = applied.try_get("user_count")?;
                        return Ok(Attempt::Done(CommitOutcome::Duplicate {
                            committed_at: unix_ms_to_time(applied.try_get("committed_at_ms")?),
                            user_count: user_count as u64,
                        }));
                    }

                    let enterprise_id: i64 = stored.try_get("enterprise_id")?;
                    if stored.try_get::<Option<i64>, _>("retired_at")?.is_some() {
                        return Err(StoreError::InstanceRetired);
                    }
                    let renamed = stored.try_get::<String, _>("hostname")? != meta.instance.hostname;
                    check_hostname_free(
                        &mut tx,
                        enterprise_id,
                        commit.instance_id,
                        &meta.instance.hostname,
                        renamed,
                    )
                    .await?;
                    let new_generated_ms = time_to_unix_ms(meta.generated_at);
                    if let Some(stored_ms) = stored.try_get::<Option<i64>, _>("generated_at_ms")?
                        && stored_ms > new_generated_ms
                    {
                        return Err(StoreError::OlderSnapshot {
                            generated_at: meta.generated_at,
                            stored: unix_ms_to_time(stored_ms),
                        });
                    }

                    sqlx::query("DELETE FROM server_users WHERE instance_id = $1")
                        .bind(commit.instance_id)
                        .execute(&mut *tx)
                        .await?;
                    Self::insert_users(&mut tx, commit.instance_id, &commit.snapshot.users).await?;

                    let now = commit.now.unix_timestamp();
                    let via = commit.via.as_str();
                    sqlx::query(
                        "UPDATE instances SET hostname = $1, ghes_version = $2, generated_at_ms = $3, \
                         user_count = $4, last_success_at = $5, last_success_via = $6, last_attempt_at = $5, \
                         last_attempt_ok = TRUE, last_attempt_via = $6, last_error = '', rows_skipped = $7, \
                         license_seats = $8, license_seats_used = $9 WHERE id = $10",
                    )
                    .bind(&meta.instance.hostname)
                    .bind(&meta.instance.ghes_version)
                    .bind(new_generated_ms)
                    .bind(commit.snapshot.users.len() as i64)
                    .bind(now)
                    .bind(via)
                    .bind(meta.source_report.rows_skipped as i64)
                    .bind(meta.license.as_ref().and_then(|l| l.seats))
                    .bind(meta.license.as_ref().map(|l| l.seats_used))
                    .bind(commit.instance_id)
                    .execute(&mut *tx)
                    .await?;
                    let inserted = sqlx::query(
                        "INSERT INTO applied_syncs (sync_id, instance_id, users_sha256, user_count, via, \
                         committed_at_ms) VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(&sync_id)
                    .bind(commit.instance_id)
                    .bind(commit.users_sha256)
                    .bind(commit.snapshot.users.len() as i64)
                    .bind(via)
                    .bind(time_to_unix_ms(commit.now))
                    .execute(&mut *tx)
                    .await;
                    match inserted {
                        Ok(_) => {}
                        Err(err) if is_unique_violation(&err) => return Ok(Attempt::RacedOnSyncId),
                        Err(err) => return Err(err.into()),
                    }
                    let generation =
                        Self::bump_users_generation(&mut tx, enterprise_id, commit.instance_id).await?;
                    tx.commit().await?;
                    Ok(Attempt::Done(CommitOutcome::Applied {
                        committed_at: commit.now,
                        generation,
                    }))
                }
            }

            pub(super) async fn bump_generation(
                tx: &mut Transaction<'_>,
                enterprise_id: i64,
            ) -> Result<i64, sqlx::Error> {
                sqlx::query_scalar(
                    "UPDATE enterprises SET generation = generation + 1 WHERE id = $1 RETURNING generation",
                )
                .bind(enterprise_id)
                .fetch_one(&mut **tx)
                .await
            }

            /// Bumps the generation and stamps the cloud members with it, so that merged views reload them.
            async fn bump_members_generation(
                tx: &mut Transaction<'_>,
                enterprise_id: i64,
            ) -> Result<(), sqlx::Error> {
                // Both right-hand sides read the row as it was, so both columns get the new value.
                sqlx::query(
                    "UPDATE enterprises SET generation = generation + 1, members_generation = generation + 1 \
                     WHERE id = $1",
                )
                .bind(enterprise_id)
                .execute(&mut **tx)
                .await?;
                Ok(())
            }

            async fn instance_by_server_id_in(
                tx: &mut Transaction<'_>,
                server_id: Uuid,
            ) -> Result<Option<Instance>, sqlx::Error> {
                let row = sqlx::query(&format!(
                    "SELECT {INSTANCE_COLUMNS} FROM instances WHERE server_id = $1"
                ))
                .bind(server_id.to_string())
                .fetch_optional(&mut **tx)
                .await?;
                row.as_ref().map(instance_from_row).transpose()
            }

            /// Refuses `hostname` when another live instance of the enterprise has it. `taking` (the instance
            /// gets a hostname it did not have, or comes back from retirement) first takes the enterprise row lock,
            /// so that two instances taking one hostname at once are serialised and the second sees the first
            /// (SQLite's writers are serialised already). A commit that keeps its hostname only reads: it cannot
            /// create a clash, and commits of an enterprise's instances keep running side by side.
            async fn check_hostname_free(
                tx: &mut Transaction<'_>,
                enterprise_id: i64,
                instance_id: i64,
                hostname: &str,
                taking: bool,
            ) -> StoreResult<()> {
                if taking {
                    $store::lock_enterprise(tx, enterprise_id).await?;
                }
                let other: Option<String> = sqlx::query_scalar(
                    "SELECT server_id FROM instances WHERE enterprise_id = $1 AND hostname = $2 AND id <> $3 \
                     AND retired_at IS NULL ORDER BY id LIMIT 1",
                )
                .bind(enterprise_id)
                .bind(hostname)
                .bind(instance_id)
                .fetch_optional(&mut **tx)
                .await?;
                match other {
                    Some(other_server_id) => Err(StoreError::HostnameTaken {
                        hostname: hostname.to_owned(),
                        other_server_id,
                    }),
                    None => Ok(()),
                }
            }

            /// Enrolls or re-enrolls an instance inside the caller's transaction (see [`Store::enroll_instance`]).
            async fn enroll_in(
                tx: &mut Transaction<'_>,
                enterprise_id: i64,
                server_id: Uuid,
                hostname: &str,
                ghes_version: Option<&str>,
                credential_sha256: &str,
                now: OffsetDateTime,
            ) -> StoreResult<Instance> {
                let ghes_version = ghes_version.filter(|version| !version.is_empty());
                // Enrollments are rare: always under the enterprise lock (a new instance takes its hostname too).
                // Taken before the insert: the insert's foreign key holds a share lock on the enterprise row, and
                // two enrollments each holding one while waiting for the other's to lock it deadlock on PostgreSQL.
                $store::lock_enterprise(tx, enterprise_id).await?;
                // Inserting first (or doing nothing) makes concurrent enrollments of one server id race on the
                // unique key instead of both inserting.
                sqlx::query(
                    "INSERT INTO instances (enterprise_id, server_id, hostname, ghes_version, created_at) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (server_id) DO NOTHING",
                )
                .bind(enterprise_id)
                .bind(server_id.to_string())
                .bind(hostname)
                .bind(ghes_version.unwrap_or_default())
                .bind(now.unix_timestamp())
                .execute(&mut **tx)
                .await?;
                let existing = sqlx::query(concat!(
                    "SELECT id, enterprise_id, retired_at, hostname FROM instances WHERE server_id = $1",
                    $for_update
                ))
                .bind(server_id.to_string())
                .fetch_one(&mut **tx)
                .await?;
                let owner: i64 = existing.try_get("enterprise_id")?;
                if owner != enterprise_id {
                    return Err(StoreError::EnrolledElsewhere { server_id });
                }
                let was_retired = existing.try_get::<Option<i64>, _>("retired_at")?.is_some();
                let instance_id: i64 = existing.try_get("id")?;
                // The enterprise lock is held already (above).
                check_hostname_free(tx, enterprise_id, instance_id, hostname, false).await?;
                sqlx::query(
                    "UPDATE instances SET credential_sha256 = $1, hostname = $2, \
                     ghes_version = COALESCE($3, ghes_version), retired_at = NULL WHERE server_id = $4",
                )
                .bind(credential_sha256)
                .bind(hostname)
                .bind(ghes_version)
                .bind(server_id.to_string())
                .execute(&mut **tx)
                .await?;
                let previous_hostname: String = existing.try_get("hostname")?;
                if was_retired || previous_hostname != hostname {
                    // Its stored users count again, or under another hostname.
                    $store::bump_users_generation(tx, enterprise_id, instance_id).await?;
                }
                instance_by_server_id_in(tx, server_id)
                    .await?
                    .ok_or_else(|| StoreError::corrupt("enrolling an instance", "row vanished"))
            }

            #[::async_trait::async_trait]
            impl Store for $store {
                async fn record_usage(
                    &self,
                    enterprise_id: i64,
                    usage: &UsageDay,
                    now: OffsetDateTime,
                ) -> StoreResult<()> {
                    let instances = serde_json::to_string(&usage.instances)
                        .map_err(|source| StoreError::Encode {
                            context: "encoding instance usage",
                            source,
                        })?;
                    let _write = self.write_guard().await;
                    sqlx::query(concat!(
                        "INSERT INTO usage_history (enterprise_id, day, consumed, max_consumed, purchased, \
                         instances_json, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                         ON CONFLICT (enterprise_id, day) DO UPDATE SET consumed = excluded.consumed, \
                         max_consumed = ",
                        $greatest,
                        "(usage_history.max_consumed, excluded.max_consumed), \
                         purchased = excluded.purchased, instances_json = excluded.instances_json, \
                         updated_at = excluded.updated_at"
                    ))
                    .bind(enterprise_id)
                    .bind(&usage.date)
                    .bind(usage.consumed)
                    .bind(usage.max_consumed)
                    .bind(usage.purchased)
                    .bind(instances)
                    .bind(now.unix_timestamp())
                    .execute(&self.pool)
                    .await?;
                    Ok(())
                }

                async fn usage_history(
                    &self,
                    enterprise_id: i64,
                    since: &str,
                    until: &str,
                ) -> StoreResult<Vec<UsageDay>> {
                    let rows = sqlx::query(
                        "SELECT day, consumed, max_consumed, purchased, instances_json FROM usage_history \
                         WHERE enterprise_id = $1 AND day >= $2 AND day <= $3 ORDER BY day",
                    )
                    .bind(enterprise_id)
                    .bind(since)
                    .bind(until)
                    .fetch_all(&self.pool)
                    .await?;
                    rows.iter().map(usage_day_from_row).collect()
                }

                async fn ping(&self) -> StoreResult<()> {
                    sqlx::query("SELECT 1").execute(&self.pool).await?;
                    Ok(())
                }

                async fn probe_write(&self) -> StoreResult<()> {
                    // Random bytes: PostgreSQL would compress zeros to nothing.
                    let payload: Vec<u8> = std::iter::repeat_with(|| Uuid::new_v4().into_bytes())
                        .take(WRITE_PROBE_BYTES / 16)
                        .flatten()
                        .collect();
                    let _write = self.write_guard().await;
                    let mut tx = self.begin_write().await?;
                    sqlx::query("DELETE FROM write_probe").execute(&mut *tx).await?;
                    sqlx::query("INSERT INTO write_probe (payload) VALUES ($1)")
                        .bind(payload)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query("DELETE FROM write_probe").execute(&mut *tx).await?;
                    tx.commit().await?;
                    Ok(())
                }

                async fn create_enterprise(
                    &self,
                    slug: &str,
                    name: &str,
                    seats: i64,
                    now: OffsetDateTime,
                ) -> StoreResult<Enterprise> {
                    let _write = self.write_guard().await;
                    let result = sqlx::query_as(
                        "INSERT INTO enterprises (slug, name, seats_purchased, created_at) \
                         VALUES ($1, $2, $3, $4) RETURNING id, slug, name, seats_purchased, generation",
                    )
                    .bind(slug)
                    .bind(name)
                    .bind(seats)
                    .bind(now.unix_timestamp())
                    .fetch_one(&self.pool)
                    .await;
                    match result {
                        Ok(enterprise) => Ok(enterprise),
                        Err(err) if is_unique_violation(&err) => Err(StoreError::SlugTaken {
                            slug: slug.to_owned(),
                        }),
                        Err(err) => Err(err.into()),
                    }
                }

                async fn set_seats_purchased(&self, enterprise_id: i64, seats: i64) -> StoreResult<()> {
                    let _write = self.write_guard().await;
                    sqlx::query(
                        "UPDATE enterprises SET seats_purchased = $1, generation = generation + 1 WHERE id = $2",
                    )
                    .bind(seats)
                    .bind(enterprise_id)
                    .execute(&self.pool)
                    .await?;
                    Ok(())
                }

                async fn enterprise_by_slug(&self, slug: &str) -> StoreResult<Option<Enterprise>> {
                    let enterprise = sqlx::query_as(
                        "SELECT id, slug, name, seats_purchased, generation FROM enterprises WHERE slug = $1",
                    )
                    .bind(slug)
                    .fetch_optional(&self.pool)
                    .await?;
                    Ok(enterprise)
                }

                async fn enterprise_by_id(&self, enterprise_id: i64) -> StoreResult<Option<Enterprise>> {
                    let enterprise = sqlx::query_as(
                        "SELECT id, slug, name, seats_purchased, generation FROM enterprises WHERE id = $1",
                    )
                    .bind(enterprise_id)
                    .fetch_optional(&self.pool)
                    .await?;
                    Ok(enterprise)
                }

                async fn list_enterprises(&self) -> StoreResult<Vec<Enterprise>> {
                    Ok(sqlx::query_as(
                        "SELECT id, slug, name, seats_purchased, generation FROM enterprises ORDER BY id",
                    )
                    .fetch_all(&self.pool)
                    .await?)
                }

                async fn enterprise_generation(&self, enterprise_id: i64) -> StoreResult<i64> {
                    let generation: Option<i64> =
                        sqlx::query_scalar("SELECT generation FROM enterprises WHERE id = $1")
                            .bind(enterprise_id)
                            .fetch_optional(&self.pool)
                            .await?;
                    generation.ok_or(StoreError::EnterpriseNotFound)
                }

                async fn create_api_token(
                    &self,
                    enterprise_id: i64,
                    token_sha256: &str,
                    token: &NewApiToken<'_>,
                    now: OffsetDateTime,
                ) -> StoreResult<ApiToken> {
                    let _write = self.write_guard().await;
                    let result = sqlx::query(concat!(
                        "INSERT INTO api_tokens (enterprise_id, token_sha256, name, scope, created_at, expires_at_ms) \
                         VALUES ($1, $2, $3, $4, $5, $6) RETURNING ",
                        api_token_columns!()
                    ))
                    .bind(enterprise_id)
                    .bind(token_sha256)
                    .bind(token.name)
                    .bind(token.scope.as_str())
                    .bind(now.unix_timestamp())
                    .bind(token.expires_at.map(time_to_unix_ms))
                    .fetch_one(&self.pool)
                    .await;
                    match result {
                        Ok(row) => Ok(api_token_from_row(&row)?),
                        Err(err) if is_unique_violation(&err) => Err(StoreError::TokenNameTaken {
                            name: token.name.to_owned(),
                        }),
                        Err(err) => Err(err.into()),
                    }
                }

                async fn api_token_by_hash(
                    &self,
                    token_sha256: &str,
                ) -> StoreResult<Option<(Enterprise, ApiToken)>> {
                    let row = sqlx::query(
                        "SELECT e.id AS e_id, e.slug, e.name AS e_name, e.seats_purchased, e.generation, \
                         t.id, t.enterprise_id, t.name, t.scope, t.created_at, t.expires_at_ms, t.last_used_at_ms, \
                         t.revoked_at FROM api_tokens t JOIN enterprises e ON e.id = t.enterprise_id \
                         WHERE t.token_sha256 = $1 AND t.revoked_at IS NULL",
                    )
                    .bind(token_sha256)
                    .fetch_optional(&self.pool)
                    .await?;
                    let Some(row) = row else { return Ok(None) };
                    let enterprise = Enterprise {
                        id: row.try_get("e_id")?,
                        slug: row.try_get("slug")?,
                        name: row.try_get("e_name")?,
                        seats_purchased: row.try_get("seats_purchased")?,
                        generation: row.try_get("generation")?,
                    };
                    Ok(Some((enterprise, api_token_from_row(&row)?)))
                }

                async fn list_api_tokens(&self, enterprise_id: i64) -> StoreResult<Vec<ApiToken>> {
                    let rows = sqlx::query(concat!(
                        "SELECT ",
                        api_token_columns!(),
                        " FROM api_tokens WHERE enterprise_id = $1 ORDER BY id"
                    ))
                    .bind(enterprise_id)
                    .fetch_all(&self.pool)
                    .await?;
                    Ok(rows.iter().map(api_token_from_row).collect::<Result<_, _>>()?)
                }

                async fn revoke_api_token(
                    &self,
                    enterprise_id: i64,
                    token: TokenSelector<'_>,
                    now: OffsetDateTime,
                ) -> StoreResult<ApiToken> {
                    let _write = self.write_guard().await;
                    // One statement for both selectors: the unused one is NULL, and `= NULL` matches nothing.
                    let (id, name) = match token {
                        TokenSelector::Id(id) => (Some(id), None),
                        TokenSelector::Name(name) => (None, Some(name)),
                    };
                    let row = sqlx::query(concat!(
                        "UPDATE api_tokens SET revoked_at = $1 \
                         WHERE enterprise_id = $2 AND revoked_at IS NULL AND (id = $3 OR name = $4) RETURNING ",
                        api_token_columns!()
                    ))
                    .bind(now.unix_timestamp())
                    .bind(enterprise_id)
                    .bind(id)
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await?;
                    let row = row.ok_or(StoreError::TokenNotFound)?;
                    Ok(api_token_from_row(&row)?)
                }

                async fn record_api_token_use(&self, token_id: i64, now: OffsetDateTime) -> StoreResult<()> {
                    let now_ms = time_to_unix_ms(now);
                    let due_before_ms = time_to_unix_ms(now - TOKEN_LAST_USE_RESOLUTION);
                    let _write = self.write_guard().await;
                    sqlx::query(
                        "UPDATE api_tokens SET last_used_at_ms = $1 \
                         WHERE id = $2 AND (last_used_at_ms IS NULL OR last_used_at_ms <= $3)",
                    )
                    .bind(now_ms)
                    .bind(token_id)
                    .bind(due_before_ms)
                    .execute(&self.pool)
                    .await?;
                    Ok(())
                }

                async fn enroll_instance(
                    &self,
                    enterprise_id: i64,
                    server_id: Uuid,
                    hostname: &str,
                    credential_sha256: &str,
                    now: OffsetDateTime,
                ) -> StoreResult<Instance> {
                    let _write = self.write_guard().await;
                    let mut tx = self.begin_write().await?;
                    let instance =
                        enroll_in(&mut tx, enterprise_id, server_id, hostname, None, credential_sha256, now)
                            .await?;
                    tx.commit().await?;
                    Ok(instance)
                }

                async fn instance_for_upload(
                    &self,
                    enterprise_id: i64,
                    server_id: Uuid,
                ) -> StoreResult<Instance> {
                    self.instance_by_server_id(enterprise_id, server_id)
                        .await?
                        .ok_or(StoreError::UploadForUnknownInstance { server_id })
                }

                async fn instance_for_credential(
                    &self,
                    credential_sha256: &str,
                ) -> StoreResult<Option<Instance>> {
                    let row = sqlx::query(&format!(
                        "SELECT {INSTANCE_COLUMNS} FROM instances \
                         WHERE credential_sha256 = $1 AND retired_at IS NULL"
                    ))
                    .bind(credential_sha256)
                    .fetch_optional(&self.pool)
                    .await?;
                    Ok(row.as_ref().map(instance_from_row).transpose()?)
                }

                async fn list_instances(&self, enterprise_id: i64) -> StoreResult<Vec<Instance>> {
                    let rows = sqlx::query(&format!(
                        "SELECT {INSTANCE_COLUMNS} FROM instances WHERE enterprise_id = $1 \
                         ORDER BY hostname, server_id"
                    ))
                    .bind(enterprise_id)
                    .fetch_all(&self.pool)
                    .await?;
                    Ok(rows
                        .iter()
                        .map(instance_from_row)
                        .collect::<Result<_, _>>()?)
                }

                async fn instance_by_server_id(
                    &self,
                    enterprise_id: i64,
                    server_id: Uuid,
                ) -> StoreResult<Option<Instance>> {
                    let row = sqlx::query(&format!(
                        "SELECT {INSTANCE_COLUMNS} FROM instances WHERE enterprise_id = $1 AND server_id = $2"
                    ))
                    .bind(enterprise_id)
                    .bind(server_id.to_string())
                    .fetch_optional(&self.pool)
                    .await?;
                    Ok(row.as_ref().map(instance_from_row).transpose()?)
                }

                async fn retire_instance(
                    &self,
                    enterprise_id: i64,
                    server_id: Uuid,
                    now: OffsetDateTime,
                ) -> StoreResult<()> {
                    let _write = self.write_guard().await;
                    let mut tx = self.begin_write().await?;
                    let updated = sqlx::query(
                        "UPDATE instances SET retired_at = $1, credential_sha256 = NULL \
                         WHERE enterprise_id = $2 AND server_id = $3 AND retired_at IS NULL",
                    )
                    .bind(now.unix_timestamp())
                    .bind(enterprise_id)
                    .bind(server_id.to_string())
                    .execute(&mut *tx)
                    .await?;
                    if updated.rows_affected() == 0 {
                        return Err(StoreError::NothingToRetire { server_id });
                    }
                    bump_generation(&mut tx, enterprise_id).await?;
                    tx.commit().await?;
                    Ok(())
                }

                async fn commit_snapshot(&self, commit: SnapshotCommit<'_>) -> StoreResult<CommitOutcome> {
                    // A race on the sync id means another replica applied this very snapshot: run again to return
                    // its receipt.
                    for _ in 0..3 {
                        match self.try_commit(&commit).await? {
                            Attempt::Done(outcome) => return Ok(outcome),
                            Attempt::RacedOnSyncId => continue,
                        }
                    }
                    Err(StoreError::CommitContended)
                }

                async fn record_failed_sync(
                    &self,
                    instance_id: i64,
                    via: Arrival,
                    error: &str,
                    now: OffsetDateTime,
                ) -> StoreResult<()> {
                    let _write = self.write_guard().await;
                    sqlx::query(
                        "UPDATE instances SET last_attempt_at = $1, last_attempt_ok = FALSE, last_attempt_via = $2, \
                         last_error = $3 WHERE id = $4",
                    )
                    .bind(now.unix_timestamp())
                    .bind(via.as_str())
                    .bind(error)
                    .bind(instance_id)
                    .execute(&self.pool)
                    .await?;
                    Ok(())
                }

                async fn replace_cloud_members(
                    &self,
                    enterprise_id: i64,
                    members: &[CloudMember],
                ) -> StoreResult<()> {
                    // Encoded before the transaction, so that no lock is held while encoding.
                    let encoded: Vec<(i64, &str, String)> = members
                        .iter()
                        .map(|member| {
                            serde_json::to_string(member)
                                .map(|json| (member.id, member.login.as_str(), json))
                                .map_err(|source| StoreError::Encode {
                                    context: "encoding a cloud member",
                                    source,
                                })
                        })
                        .collect::<Result<_, _>>()?;
                    let _write = self.write_guard().await;
                    let mut tx = self.begin_write().await?;
                    Self::lock_enterprise(&mut tx, enterprise_id).await?;
                    sqlx::query("DELETE FROM cloud_members WHERE enterprise_id = $1")
                        .bind(enterprise_id)
                        .execute(&mut *tx)
                        .await?;
                    Self::insert_cloud_members(&mut tx, enterprise_id, &encoded).await?;
                    bump_members_generation(&mut tx, enterprise_id).await?;
                    tx.commit().await?;
                    Ok(())
                }

                async fn load_merge_changes(
                    &self,
                    enterprise_id: i64,
                    since: Option<i64>,
                ) -> StoreResult<MergeChanges> {
                    let mut tx = self.begin_snapshot_read().await?;
                    let enterprise = sqlx::query(
                        "SELECT generation, seats_purchased, members_generation FROM enterprises WHERE id = $1",
                    )
                    .bind(enterprise_id)
                    .fetch_optional(&mut *tx)
                    .await?
                    .ok_or(StoreError::EnterpriseNotFound)?;
                    let changed_after = |generation: i64| since.is_none_or(|since| generation > since);

                    let instances = sqlx::query(
                        "SELECT id, hostname, users_generation FROM instances \
                         WHERE enterprise_id = $1 AND retired_at IS NULL ORDER BY id",
                    )
                    .bind(enterprise_id)
                    .fetch_all(&mut *tx)
                    .await?
                    .iter()
                    .map(InstanceVersion::from_row)
                    .collect::<Result<Vec<_>, _>>()?;
                    let mut changed_users: Vec<(i64, Accounts)> = instances
                        .iter()
                        .filter(|instance| changed_after(instance.users_generation))
                        .map(|instance| (instance.id, Accounts::new()))
                        .collect();
                    for (instance_id, users) in &mut changed_users {
                        let sql = format!(
                            "SELECT {ACCOUNT_COLUMNS} FROM server_users u WHERE u.instance_id = $1"
                        );
                        *users =
                            collect_accounts(sqlx::query(&sql).bind(*instance_id).fetch(&mut *tx)).await?;
                    }

                    let cloud_members = if changed_after(enterprise.try_get("members_generation")?) {
                        let rows = sqlx::query(
                            "SELECT attributes_json FROM cloud_members WHERE enterprise_id = $1 \
                             ORDER BY member_id",
                        )
                        .bind(enterprise_id)
                        .fetch(&mut *tx);
                        Some(collect_cloud_directory(rows).await?)
                    } else {
                        None
                    };
                    tx.commit().await?;
                    Ok(MergeChanges {
                        generation: enterprise.try_get("generation")?,
                        seats_purchased: enterprise.try_get("seats_purchased")?,
                        instances,
                        changed_users,
                        cloud_members,
                    })
                }

                async fn create_enrollment_token(
                    &self,
                    enterprise_id: i64,
                    token_sha256: &str,
                    expires_at: OffsetDateTime,
                    now: OffsetDateTime,
                ) -> StoreResult<()> {
                    let _write = self.write_guard().await;
                    let mut tx = self.begin_write().await?;
                    let forget_before = time_to_unix_ms(now - CONNECTION_RECORD_RETENTION);
                    sqlx::query(
                        "DELETE FROM enrollment_tokens WHERE enterprise_id = $1 \
                         AND (expires_at_ms < $2 OR used_at_ms < $2)",
                    )
                    .bind(enterprise_id)
                    .bind(forget_before)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        "INSERT INTO enrollment_tokens (enterprise_id, token_sha256, created_at_ms, expires_at_ms) \
                         VALUES ($1, $2, $3, $4)",
                    )
                    .bind(enterprise_id)
                    .bind(token_sha256)
                    .bind(time_to_unix_ms(now))
                    .bind(time_to_unix_ms(expires_at))
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    Ok(())
                }

                async fn redeem_enrollment_token(
                    &self,
                    token_sha256: &str,
                    server_id: Uuid,
                    hostname: &str,
                    ghes_version: &str,
                    credential_sha256: &str,
                    now: OffsetDateTime,
                ) -> StoreResult<(Enterprise, Instance)> {
                    let _write = self.write_guard().await;
                    let mut tx = self.begin_write().await?;
                    let now_ms = time_to_unix_ms(now);
                    // The row lock makes a concurrent redemption of the same token wait, then see it used.
                    let token = sqlx::query(concat!(
                        "SELECT id, enterprise_id FROM enrollment_tokens \
                         WHERE token_sha256 = $1 AND used_at_ms IS NULL AND expires_at_ms > $2",
                        $for_update
                    ))
                    .bind(token_sha256)
                    .bind(now_ms)
                    .fetch_optional(&mut *tx)
                    .await?
                    .ok_or(StoreError::EnrollmentTokenRefused)?;
                    let token_id: i64 = token.try_get("id")?;
                    let enterprise_id: i64 = token.try_get("enterprise_id")?;
                    let instance = enroll_in(
                        &mut tx,
                        enterprise_id,
                        server_id,
                        hostname,
                        Some(ghes_version),
                        credential_sha256,
                        now,
                    )
                    .await?;
                    let spent = sqlx::query(
                        "UPDATE enrollment_tokens SET used_at_ms = $1, used_by_server_id = $2 \
                         WHERE id = $3 AND used_at_ms IS NULL",
                    )
                    .bind(now_ms)
                    .bind(server_id.to_string())
                    .bind(token_id)
                    .execute(&mut *tx)
                    .await?;
                    if spent.rows_affected() != 1 {
                        return Err(StoreError::EnrollmentTokenRefused);
                    }
                    let enterprise = sqlx::query_as(
                        "SELECT id, slug, name, seats_purchased, generation FROM enterprises WHERE id = $1",
                    )
                    .bind(enterprise_id)
                    .fetch_one(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    Ok((enterprise, instance))
                }

                async fn record_agent_presence(
                    &self,
                    instance_id: i64,
                    credential_sha256: &str,
                    report: AgentReport<'_>,
                ) -> StoreResult<()> {
                    let _write = self.write_guard().await;
                    let updated = sqlx::query(
                        "UPDATE instances SET agent_session_id = $1, agent_last_seen_at_ms = $2, \
                         agent_sync_enabled = $3, agent_version = COALESCE($4, agent_version), \
                         agent_pending_deliveries = COALESCE($5, agent_pending_deliveries) \
                         WHERE id = $6 AND credential_sha256 = $7 AND retired_at IS NULL",
                    )
                    .bind(report.session_id.to_string())
                    .bind(time_to_unix_ms(report.seen_at))
                    .bind(report.sync_enabled)
                    .bind(report.version)
                    .bind(report.pending_deliveries.map(i64::from))
                    .bind(instance_id)
                    .bind(credential_sha256)
                    .execute(&self.pool)
                    .await?;
                    if updated.rows_affected() == 0 {
                        return Err(StoreError::CredentialRevoked);
                    }
                    Ok(())
                }

                async fn end_agent_session(
                    &self,
                    instance_id: i64,
                    session_id: Uuid,
                    now: OffsetDateTime,
                ) -> StoreResult<()> {
                    let _write = self.write_guard().await;
                    sqlx::query(
                        "UPDATE instances SET agent_session_id = NULL, \
                         agent_last_seen_at_ms = CASE WHEN agent_last_seen_at_ms IS NULL \
                         OR agent_last_seen_at_ms < $1 THEN $1 ELSE agent_last_seen_at_ms END \
                         WHERE id = $2 AND agent_session_id = $3",
                    )
                    .bind(time_to_unix_ms(now))
                    .bind(instance_id)
                    .bind(session_id.to_string())
                    .execute(&self.pool)
                    .await?;
                    Ok(())
                }

                async fn create_sync_request(
                    &self,
                    enterprise_id: i64,
                    server_id: Uuid,
                    request_id: Uuid,
                    now: OffsetDateTime,
                ) -> StoreResult<SyncRequest> {
                    let _write = self.write_guard().await;
                    let mut tx = self.begin_write().await?;
                    // FOR SHARE: a concurrent retirement waits for this request to be queued (and then stops its
                    // delivery).
                    let instance = sqlx::query(concat!(
                        "SELECT id, credential_sha256 IS NOT NULL AS has_credential FROM instances \
                         WHERE enterprise_id = $1 AND server_id = $2 AND retired_at IS NULL",
                        $for_share
                    ))
                    .bind(enterprise_id)
                    .bind(server_id.to_string())
                    .fetch_optional(&mut *tx)
                    .await?
                    .ok_or(StoreError::NoActiveInstance { server_id })?;
                    let instance_id: i64 = instance.try_get("id")?;
                    if !instance.try_get::<bool, _>("has_credential")? {
                        return Err(StoreError::NoAgent { server_id });
                    }
                    sqlx::query("DELETE FROM sync_requests WHERE instance_id = $1 AND requested_at_ms < $2")
                        .bind(instance_id)
                        .bind(time_to_unix_ms(now - CONNECTION_RECORD_RETENTION))
                        .execute(&mut *tx)
                        .await?;
                    let row = sqlx::query(&format!(
                        "INSERT INTO sync_requests (request_id, instance_id, requested_at_ms) \
                         VALUES ($1, $2, $3) RETURNING {SYNC_REQUEST_COLUMNS}"
                    ))
                    .bind(request_id.to_string())
                    .bind(instance_id)
                    .bind(time_to_unix_ms(now))
                    .fetch_one(&mut *tx)
                    .await?;
                    let request = sync_request_from_row(&row)?;
                    tx.commit().await?;
                    Ok(request)
                }

                async fn claim_sync_requests(
                    &self,
                    instance_id: i64,
                    credential_sha256: &str,
                    now: OffsetDateTime,
                ) -> StoreResult<Vec<SyncRequest>> {
                    let not_before = time_to_unix_ms(now - SYNC_REQUEST_TTL);
                    // The poll every stream runs every second: one read on the partial index, without the write
                    // lock or row locks.
                    let probe = sqlx::query(
                        "SELECT credential_sha256 = $1 AND retired_at IS NULL AS live, \
                         EXISTS (SELECT 1 FROM sync_requests r WHERE r.instance_id = i.id \
                                 AND r.delivered_at_ms IS NULL AND r.requested_at_ms >= $2) AS pending \
                         FROM instances i WHERE i.id = $3",
                    )
                    .bind(credential_sha256)
                    .bind(not_before)
                    .bind(instance_id)
                    .fetch_optional(&self.pool)
                    .await?;
                    let Some(probe) = probe else {
                        return Err(StoreError::CredentialRevoked);
                    };
                    if probe.try_get::<Option<bool>, _>("live")? != Some(true) {
                        return Err(StoreError::CredentialRevoked);
                    }
                    if !probe.try_get::<bool, _>("pending")? {
                        return Ok(Vec::new());
                    }
                    let _write = self.write_guard().await;
                    // A PostgreSQL replica racing us for the same rows waits on their locks, then re-checks
                    // `delivered_at_ms IS NULL` (READ COMMITTED) and skips them: each request is returned once.
                    let rows = sqlx::query(&format!(
                        "UPDATE sync_requests SET delivered_at_ms = $1 \
                         WHERE instance_id = $2 AND delivered_at_ms IS NULL AND requested_at_ms >= $3 \
                         AND EXISTS (SELECT 1 FROM instances i WHERE i.id = $2 AND i.credential_sha256 = $4 \
                                     AND i.retired_at IS NULL) \
                         RETURNING {SYNC_REQUEST_COLUMNS}"
                    ))
                    .bind(time_to_unix_ms(now))
                    .bind(instance_id)
                    .bind(not_before)
                    .bind(credential_sha256)
                    .fetch_all(&self.pool)
                    .await?;
                    let mut claimed = rows
                        .iter()
                        .map(sync_request_from_row)
                        .collect::<Result<Vec<_>, _>>()?;
                    claimed.sort_by_key(|request| (request.requested_at, request.request_id));
                    Ok(claimed)
                }

                async fn release_sync_request(&self, instance_id: i64, request_id: Uuid) -> StoreResult<()> {
                    let _write = self.write_guard().await;
                    sqlx::query(
                        "UPDATE sync_requests SET delivered_at_ms = NULL \
                         WHERE request_id = $1 AND instance_id = $2 AND acked_at_ms IS NULL",
                    )
                    .bind(request_id.to_string())
                    .bind(instance_id)
                    .execute(&self.pool)
                    .await?;
                    Ok(())
                }

                async fn record_sync_ack(
                    &self,
                    instance_id: i64,
                    ack: SyncAckRecord<'_>,
                ) -> StoreResult<AckOutcome> {
                    let _write = self.write_guard().await;
                    let mut tx = self.begin_write().await?;
                    let acked: Option<Option<i64>> = sqlx::query_scalar(concat!(
                        "SELECT acked_at_ms FROM sync_requests \
                         WHERE request_id = $1 AND instance_id = $2 AND delivered_at_ms IS NOT NULL",
                        $for_update
                    ))
                    .bind(ack.request_id.to_string())
                    .bind(instance_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let outcome = match acked {
                        None => AckOutcome::Unknown,
                        Some(Some(_)) => AckOutcome::AlreadyAcked,
                        Some(None) => {
                            sqlx::query(
                                "UPDATE sync_requests SET acked_at_ms = $1, accepted = $2, job_id = $3, \
                                 reason = $4 WHERE request_id = $5 AND instance_id = $6",
                            )
                            .bind(time_to_unix_ms(ack.acked_at))
                            .bind(ack.accepted)
                            .bind(ack.job_id)
                            .bind(ack.reason)
                            .bind(ack.request_id.to_string())
                            .bind(instance_id)
                            .execute(&mut *tx)
                            .await?;
                            AckOutcome::Recorded
                        }
                    };
                    tx.commit().await?;
                    Ok(outcome)
                }

                async fn sync_request(
                    &self,
                    enterprise_id: i64,
                    server_id: Uuid,
                    request_id: Uuid,
                ) -> StoreResult<Option<SyncRequest>> {
                    let row = sqlx::query(
                        "SELECT r.request_id, r.instance_id, r.requested_at_ms, r.delivered_at_ms, \
                         r.acked_at_ms, r.accepted, r.job_id, r.reason \
                         FROM sync_requests r JOIN instances i ON i.id = r.instance_id \
                         WHERE r.request_id = $1 AND i.enterprise_id = $2 AND i.server_id = $3",
                    )
                    .bind(request_id.to_string())
                    .bind(enterprise_id)
                    .bind(server_id.to_string())
                    .fetch_optional(&self.pool)
                    .await?;
                    Ok(row.as_ref().map(sync_request_from_row).transpose()?)
                }

                async fn add_usage_file_key(
                    &self,
                    enterprise_id: i64,
                    public_key: &str,
                    secret_key: &str,
                    now: OffsetDateTime,
                ) -> StoreResult<UsageFileKey> {
                    let _write = self.write_guard().await;
                    let key = sqlx::query_as(
                        "INSERT INTO usage_file_keys (enterprise_id, public_key, secret_key, created_at_ms) \
                         VALUES ($1, $2, $3, $4) RETURNING id, public_key, secret_key, created_at_ms",
                    )
                    .bind(enterprise_id)
                    .bind(public_key)
                    .bind(secret_key)
                    .bind(time_to_unix_ms(now))
                    .fetch_one(&self.pool)
                    .await?;
                    Ok(key)
                }

                async fn usage_file_keys(&self, enterprise_id: i64) -> StoreResult<Vec<UsageFileKey>> {
                    let keys = sqlx::query_as(
                        "SELECT id, public_key, secret_key, created_at_ms FROM usage_file_keys \
                         WHERE enterprise_id = $1 ORDER BY id DESC",
                    )
                    .bind(enterprise_id)
                    .fetch_all(&self.pool)
                    .await?;
                    Ok(keys)
                }

                async fn create_console_session(
                    &self,
                    session: &NewConsoleSession<'_>,
                    now: OffsetDateTime,
                ) -> StoreResult<()> {
                    let _write = self.write_guard().await;
                    let mut tx = self.begin_write().await?;
                    sqlx::query("DELETE FROM console_sessions WHERE enterprise_id = $1 AND expires_at_ms <= $2")
                        .bind(session.enterprise_id)
                        .bind(time_to_unix_ms(now))
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query(
                        "INSERT INTO console_sessions (id_sha256, enterprise_id, api_token_id, scope, created_at_ms, \
                         expires_at_ms) VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(session.id_sha256)
                    .bind(session.enterprise_id)
                    .bind(session.api_token_id)
                    .bind(session.scope.as_str())
                    .bind(time_to_unix_ms(now))
                    .bind(time_to_unix_ms(session.expires_at))
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    Ok(())
                }

                async fn console_session(
                    &self,
                    id_sha256: &str,
                    now: OffsetDateTime,
                ) -> StoreResult<Option<ConsoleSession>> {
                    let now_ms = time_to_unix_ms(now);
                    // A session opened with a REST token lives only as long as the token does.
                    let row = sqlx::query(
                        "SELECT e.id, e.slug, e.name, e.seats_purchased, e.generation, s.scope, s.expires_at_ms \
                         FROM console_sessions s JOIN enterprises e ON e.id = s.enterprise_id \
                         LEFT JOIN api_tokens t ON t.id = s.api_token_id \
                         WHERE s.id_sha256 = $1 AND s.expires_at_ms > $2 AND (s.api_token_id IS NULL OR \
                         (t.revoked_at IS NULL AND (t.expires_at_ms IS NULL OR t.expires_at_ms > $2)))",
                    )
                    .bind(id_sha256)
                    .bind(now_ms)
                    .fetch_optional(&self.pool)
                    .await?;
                    let Some(row) = row else { return Ok(None) };
                    let scope: String = row.try_get("scope")?;
                    Ok(Some(ConsoleSession {
                        enterprise: Enterprise::from_row(&row)?,
                        // The column's CHECK allows only the two words.
                        scope: TokenScope::parse(&scope).ok_or_else(|| {
                            StoreError::corrupt("reading a console session", "unknown scope")
                        })?,
                        expires_at: unix_ms_to_time(row.try_get("expires_at_ms")?),
                    }))
                }

                async fn delete_console_session(&self, id_sha256: &str) -> StoreResult<bool> {
                    let _write = self.write_guard().await;
                    let deleted = sqlx::query("DELETE FROM console_sessions WHERE id_sha256 = $1")
                        .bind(id_sha256)
                        .execute(&self.pool)
                        .await?;
                    Ok(deleted.rows_affected() > 0)
                }

                async fn create_console_link(
                    &self,
                    enterprise_id: i64,
                    token_sha256: &str,
                    expires_at: OffsetDateTime,
                    now: OffsetDateTime,
                ) -> StoreResult<()> {
                    let _write = self.write_guard().await;
                    let mut tx = self.begin_write().await?;
                    let forget_before = time_to_unix_ms(now - CONNECTION_RECORD_RETENTION);
                    sqlx::query(
                        "DELETE FROM console_links WHERE enterprise_id = $1 \
                         AND (expires_at_ms < $2 OR used_at_ms < $2)",
                    )
                    .bind(enterprise_id)
                    .bind(forget_before)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        "INSERT INTO console_links (token_sha256, enterprise_id, created_at_ms, expires_at_ms) \
                         VALUES ($1, $2, $3, $4)",
                    )
                    .bind(token_sha256)
                    .bind(enterprise_id)
                    .bind(time_to_unix_ms(now))
                    .bind(time_to_unix_ms(expires_at))
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    Ok(())
                }

                async fn redeem_console_link(
                    &self,
                    token_sha256: &str,
                    now: OffsetDateTime,
                ) -> StoreResult<Option<Enterprise>> {
                    let _write = self.write_guard().await;
                    let mut tx = self.begin_write().await?;
                    // One statement decides: of two replicas redeeming at once, only one updates the row.
                    let enterprise_id: Option<i64> = sqlx::query_scalar(
                        "UPDATE console_links SET used_at_ms = $1 \
                         WHERE token_sha256 = $2 AND used_at_ms IS NULL AND expires_at_ms > $1 \
                         RETURNING enterprise_id",
                    )
                    .bind(time_to_unix_ms(now))
                    .bind(token_sha256)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let Some(enterprise_id) = enterprise_id else {
                        return Ok(None);
                    };
                    let enterprise = sqlx::query_as(
                        "SELECT id, slug, name, seats_purchased, generation FROM enterprises WHERE id = $1",
                    )
                    .bind(enterprise_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    Ok(enterprise)
                }
            }
        }
    };
}

pub(super) use sql_store;
