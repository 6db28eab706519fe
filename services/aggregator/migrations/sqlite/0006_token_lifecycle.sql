-- REST tokens get a name (unique among an enterprise's live tokens, so that `token revoke --name` names one), a
-- scope (`read`: every GET; `admin`: every change), an optional expiry and the time of their last use (written at
-- most once a minute per token). Tokens made before scopes existed could change everything: they become `admin`.
ALTER TABLE api_tokens RENAME COLUMN description TO name;
ALTER TABLE api_tokens ADD COLUMN scope TEXT NOT NULL DEFAULT 'admin' CHECK (scope IN ('read', 'admin'));
ALTER TABLE api_tokens ADD COLUMN expires_at_ms INTEGER;
ALTER TABLE api_tokens ADD COLUMN last_used_at_ms INTEGER;
-- Descriptions were free text and often the default "owner token": a repeated one gets the token's id appended.
UPDATE api_tokens SET name = name || ' #' || id
WHERE (SELECT COUNT(*) FROM api_tokens same
       WHERE same.enterprise_id = api_tokens.enterprise_id AND same.name = api_tokens.name) > 1;
CREATE UNIQUE INDEX api_tokens_live_name ON api_tokens (enterprise_id, name) WHERE revoked_at IS NULL;
