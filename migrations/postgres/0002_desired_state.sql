-- The lifecycle keeps what the user asked for (desired) apart from what was
-- last observed (status), and when the status last changed. `error` is the
-- last error, shown as `last_error`.
ALTER TABLE hostings ADD COLUMN desired TEXT NOT NULL DEFAULT 'running';
ALTER TABLE hostings ADD COLUMN state_since TEXT NOT NULL DEFAULT '';
UPDATE hostings SET desired = 'stopped' WHERE status = 'stopped';
UPDATE hostings SET state_since = updated_at;
