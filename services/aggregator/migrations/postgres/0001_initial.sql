-- license-sync aggregator schema (PostgreSQL). Same tables and meaning as migrations/sqlite/0001_initial.sql.
-- Timestamps are Unix seconds (BIGINT) unless named *_ms.

CREATE TABLE enterprises (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    slug            TEXT NOT NULL UNIQUE,
    name            TEXT NOT NULL,
    seats_purchased BIGINT NOT NULL CHECK (seats_purchased >= 0),
    -- Bumped by every change to the enterprise's accounts or members; merged views are cached per generation.
    generation      BIGINT NOT NULL DEFAULT 0,
    created_at      BIGINT NOT NULL
);

-- REST tokens of enterprise owners. Only the SHA-256 of a token is stored.
CREATE TABLE api_tokens (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    enterprise_id BIGINT NOT NULL REFERENCES enterprises (id) ON DELETE CASCADE,
    token_sha256  TEXT NOT NULL UNIQUE,
    description   TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    revoked_at    BIGINT
);

CREATE TABLE instances (
    id                 BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    enterprise_id      BIGINT NOT NULL REFERENCES enterprises (id) ON DELETE CASCADE,
    server_id          TEXT NOT NULL UNIQUE,
    hostname           TEXT NOT NULL,
    ghes_version       TEXT NOT NULL DEFAULT '',
    credential_sha256  TEXT UNIQUE,
    created_at         BIGINT NOT NULL,
    retired_at         BIGINT,
    generated_at_ms    BIGINT,
    user_count         BIGINT NOT NULL DEFAULT 0,
    last_success_at    BIGINT,
    last_success_via   TEXT,
    last_attempt_at    BIGINT,
    last_attempt_ok    BOOLEAN,
    last_attempt_via   TEXT,
    last_error         TEXT NOT NULL DEFAULT '',
    rows_skipped       BIGINT NOT NULL DEFAULT 0,
    license_seats      BIGINT,
    license_seats_used BIGINT
);

CREATE INDEX instances_by_enterprise ON instances (enterprise_id);

CREATE TABLE server_users (
    instance_id        BIGINT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    user_id            BIGINT NOT NULL,
    login              TEXT NOT NULL,
    email              TEXT NOT NULL,
    role               TEXT NOT NULL,
    suspended          BOOLEAN NOT NULL,
    dormant            BOOLEAN NOT NULL,
    created_at         BIGINT,
    last_active        BIGINT,
    two_factor_enabled BOOLEAN,
    PRIMARY KEY (instance_id, user_id)
);

CREATE TABLE applied_syncs (
    sync_id         TEXT PRIMARY KEY,
    instance_id     BIGINT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    users_sha256    TEXT NOT NULL,
    user_count      BIGINT NOT NULL,
    via             TEXT NOT NULL,
    committed_at_ms BIGINT NOT NULL
);

CREATE TABLE cloud_members (
    enterprise_id   BIGINT NOT NULL REFERENCES enterprises (id) ON DELETE CASCADE,
    member_id       BIGINT NOT NULL,
    login           TEXT NOT NULL,
    attributes_json TEXT NOT NULL,
    PRIMARY KEY (enterprise_id, member_id)
);
