-- Readiness writes (and deletes) one row here to prove the database can still grow (`Store::probe_write`).
CREATE TABLE write_probe (
    payload BYTEA NOT NULL
);
