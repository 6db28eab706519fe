-- The owner's web console (issue 12): server-side sessions and one-time sign-in links, in the store so that every
-- replica accepts a session another one opened. Only SHA-256 hashes of the session id and of the link token are
-- stored: a leaked database opens no console. Same tables and meaning in both backends' migrations.
CREATE TABLE console_sessions (
    id_sha256     TEXT PRIMARY KEY,
    enterprise_id INTEGER NOT NULL REFERENCES enterprises (id) ON DELETE CASCADE,
    -- The REST token signed in with: revoking it (or its expiry) ends the session. NULL for a sign-in link.
    api_token_id  INTEGER REFERENCES api_tokens (id) ON DELETE CASCADE,
    scope         TEXT NOT NULL CHECK (scope IN ('read', 'admin')),
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
CREATE INDEX console_sessions_by_enterprise ON console_sessions (enterprise_id, expires_at_ms);

CREATE TABLE console_links (
    token_sha256  TEXT PRIMARY KEY,
    enterprise_id INTEGER NOT NULL REFERENCES enterprises (id) ON DELETE CASCADE,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    used_at_ms    INTEGER
);
CREATE INDEX console_links_by_enterprise ON console_links (enterprise_id, expires_at_ms);
