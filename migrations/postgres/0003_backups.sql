-- Backups of a hosting's disk. A row is `running` while QEMU copies and
-- becomes `complete` only after the file got its final name; at start every
-- row still `running` is removed with its files (see hosting::backups).
-- `parent_id` is the backup an incremental file is backed by (NULL: backed
-- by the base image only).
CREATE TABLE backups (
    id BIGSERIAL PRIMARY KEY,
    hosting_id BIGINT NOT NULL REFERENCES hostings(id) ON DELETE CASCADE,
    parent_id BIGINT,
    kind TEXT NOT NULL,
    consistency TEXT NOT NULL,
    status TEXT NOT NULL,
    size_bytes BIGINT NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    completed_at TEXT
);
CREATE INDEX backups_hosting ON backups (hosting_id, id);
