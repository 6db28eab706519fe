-- The enterprises' age key pairs for encrypted usage files (issue 11). `license-sync-aggregator enterprise keygen`
-- adds one; every key is kept so that files encrypted before a rotation still decrypt, and the newest (highest id)
-- is the public key handed to agents. The secret key (`AGE-SECRET-KEY-1…`) is stored as is: whoever can read this
-- database can read the users it holds anyway.
CREATE TABLE usage_file_keys (
    id            INTEGER PRIMARY KEY,
    enterprise_id INTEGER NOT NULL REFERENCES enterprises (id) ON DELETE CASCADE,
    public_key    TEXT NOT NULL UNIQUE,
    secret_key    TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
);

CREATE INDEX usage_file_keys_by_enterprise ON usage_file_keys (enterprise_id, id);
