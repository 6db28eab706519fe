-- The enterprises' age key pairs for encrypted usage files (issue 11). Same table and meaning as
-- migrations/sqlite/0008_usage_file_keys.sql.
CREATE TABLE usage_file_keys (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    enterprise_id BIGINT NOT NULL REFERENCES enterprises (id) ON DELETE CASCADE,
    public_key    TEXT NOT NULL UNIQUE,
    secret_key    TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);

CREATE INDEX usage_file_keys_by_enterprise ON usage_file_keys (enterprise_id, id);
