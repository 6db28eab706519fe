-- Which generation last changed an instance's users and an enterprise's cloud members, so that a merged view can
-- reload only what changed since the generation it was built from (incremental merge).
ALTER TABLE instances ADD COLUMN users_generation INTEGER NOT NULL DEFAULT 0;
ALTER TABLE enterprises ADD COLUMN members_generation INTEGER NOT NULL DEFAULT 0;
