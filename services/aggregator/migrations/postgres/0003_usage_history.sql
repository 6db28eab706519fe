-- Daily license usage per enterprise (GitLab's "max historical users" and the trend owners chart).
-- One row per enterprise and UTC day, updated whenever the merged view is rebuilt that day.
CREATE TABLE usage_history (
    enterprise_id  BIGINT NOT NULL REFERENCES enterprises (id) ON DELETE CASCADE,
    -- UTC date, YYYY-MM-DD.
    day            TEXT NOT NULL,
    -- The latest count recorded that day, and the highest.
    consumed       BIGINT NOT NULL,
    max_consumed   BIGINT NOT NULL,
    purchased      BIGINT NOT NULL,
    -- JSON array of {"hostname", "accounts", "consuming"} per active instance, at the latest record.
    instances_json TEXT NOT NULL,
    updated_at     BIGINT NOT NULL,
    PRIMARY KEY (enterprise_id, day)
);
