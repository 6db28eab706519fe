-- license-sync aggregator schema (SQLite).
-- Timestamps are Unix seconds (INTEGER) unless named *_ms.

CREATE TABLE enterprises (
    id              INTEGER PRIMARY KEY,
    slug            TEXT NOT NULL UNIQUE,
    name            TEXT NOT NULL,
    seats_purchased INTEGER NOT NULL CHECK (seats_purchased >= 0),
    -- Bumped by every change to the enterprise's accounts or members; merged views are cached per generation.
    generation      INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL
);

-- REST tokens of enterprise owners. Only the SHA-256 of a token is stored.
CREATE TABLE api_tokens (
    id            INTEGER PRIMARY KEY,
    enterprise_id INTEGER NOT NULL REFERENCES enterprises (id) ON DELETE CASCADE,
    token_sha256  TEXT NOT NULL UNIQUE,
    description   TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    revoked_at    INTEGER
);

CREATE TABLE instances (
    id                INTEGER PRIMARY KEY,
    enterprise_id     INTEGER NOT NULL REFERENCES enterprises (id) ON DELETE CASCADE,
    server_id         TEXT NOT NULL UNIQUE,
    hostname          TEXT NOT NULL,
    ghes_version      TEXT NOT NULL DEFAULT '',
    -- SHA-256 of the instance credential; NULL for instances known only from manual uploads.
    credential_sha256 TEXT UNIQUE,
    created_at        INTEGER NOT NULL,
    retired_at        INTEGER,
    -- The snapshot currently stored.
    generated_at_ms   INTEGER,
    user_count        INTEGER NOT NULL DEFAULT 0,
    last_success_at   INTEGER,
    last_success_via  TEXT,
    -- The latest attempt, successful or not.
    last_attempt_at   INTEGER,
    last_attempt_ok   INTEGER,
    last_attempt_via  TEXT,
    last_error        TEXT NOT NULL DEFAULT '',
    rows_skipped      INTEGER NOT NULL DEFAULT 0,
    license_seats     INTEGER,
    license_seats_used INTEGER
);

CREATE INDEX instances_by_enterprise ON instances (enterprise_id);

-- The users of each instance's latest snapshot, replaced whole by each sync.
CREATE TABLE server_users (
    instance_id        INTEGER NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    user_id            INTEGER NOT NULL,
    login              TEXT NOT NULL,
    email              TEXT NOT NULL,
    role               TEXT NOT NULL,
    suspended          INTEGER NOT NULL,
    dormant            INTEGER NOT NULL,
    created_at         INTEGER,
    last_active        INTEGER,
    two_factor_enabled INTEGER,
    PRIMARY KEY (instance_id, user_id)
) WITHOUT ROWID;

-- Every applied snapshot, by sync id: a retried sync is acknowledged again but applied once.
CREATE TABLE applied_syncs (
    sync_id      TEXT PRIMARY KEY,
    instance_id  INTEGER NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    users_sha256 TEXT NOT NULL,
    user_count   INTEGER NOT NULL,
    via          TEXT NOT NULL,
    committed_at_ms INTEGER NOT NULL
);

-- The enterprise's cloud members, replaced whole by each import. List fields are JSON arrays.
CREATE TABLE cloud_members (
    enterprise_id    INTEGER NOT NULL REFERENCES enterprises (id) ON DELETE CASCADE,
    member_id        INTEGER NOT NULL,
    login            TEXT NOT NULL,
    attributes_json  TEXT NOT NULL,
    PRIMARY KEY (enterprise_id, member_id)
) WITHOUT ROWID;
