-- The account's token version: every JWT and web session carries the version
-- it was issued under and is refused once the account's moves on, so a
-- password change or "log out everywhere" revokes them all at once.
ALTER TABLE users ADD COLUMN token_version INTEGER NOT NULL DEFAULT 0;
