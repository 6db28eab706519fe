-- Connection between agents and the aggregator (issue 3): one-time enrollment tokens, agent presence, and the
-- owners' "Sync now" requests delivered over the control stream. Timestamps are Unix milliseconds (*_ms).

-- One-time tokens an owner creates for an agent to enroll with. Only the SHA-256 of a token is stored.
CREATE TABLE enrollment_tokens (
    id                INTEGER PRIMARY KEY,
    enterprise_id     INTEGER NOT NULL REFERENCES enterprises (id) ON DELETE CASCADE,
    token_sha256      TEXT NOT NULL UNIQUE,
    created_at_ms     INTEGER NOT NULL,
    expires_at_ms     INTEGER NOT NULL,
    -- Set once, when an agent redeemed the token; a used token never works again.
    used_at_ms        INTEGER,
    used_by_server_id TEXT
);

CREATE INDEX enrollment_tokens_by_enterprise ON enrollment_tokens (enterprise_id);

-- Agent presence, written by whichever aggregator replica holds the agent's control stream.
-- agent_session_id is the stream that wrote last; it is cleared when that stream ends.
ALTER TABLE instances ADD COLUMN agent_session_id TEXT;
ALTER TABLE instances ADD COLUMN agent_last_seen_at_ms INTEGER;
ALTER TABLE instances ADD COLUMN agent_sync_enabled INTEGER;
ALTER TABLE instances ADD COLUMN agent_version TEXT;
ALTER TABLE instances ADD COLUMN agent_pending_deliveries INTEGER;

-- "Sync now" requests of owners. Delivered at most once (delivered_at_ms is set in the transaction that hands the
-- request to one control stream); one never delivered within 24 hours is expired.
CREATE TABLE sync_requests (
    request_id      TEXT PRIMARY KEY,
    instance_id     INTEGER NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    requested_at_ms INTEGER NOT NULL,
    delivered_at_ms INTEGER,
    acked_at_ms     INTEGER,
    accepted        INTEGER,
    job_id          TEXT NOT NULL DEFAULT '',
    reason          TEXT NOT NULL DEFAULT ''
);

-- What every control stream polls: this instance's undelivered requests.
CREATE INDEX sync_requests_undelivered ON sync_requests (instance_id, requested_at_ms)
    WHERE delivered_at_ms IS NULL;
CREATE INDEX sync_requests_by_instance ON sync_requests (instance_id, requested_at_ms);
