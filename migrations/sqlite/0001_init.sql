-- Accounts, their SSH keys, hostings (one per user) and the steps journal.
-- Timestamps are RFC 3339 text written by webhoster, the same on both backends.
CREATE TABLE users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    email TEXT NOT NULL UNIQUE,
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE TABLE ssh_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    public_key TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (user_id, public_key)
);

-- Every allocation is unique here, so two concurrent creates cannot share one.
CREATE TABLE hostings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL UNIQUE REFERENCES users(id) ON DELETE CASCADE,
    vm_id TEXT NOT NULL UNIQUE,
    vm_ip TEXT NOT NULL UNIQUE,
    mac TEXT NOT NULL UNIQUE,
    ssh_port INTEGER NOT NULL UNIQUE,
    status TEXT NOT NULL,
    step TEXT,
    error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

-- The journal: each step of a create is written before (pending) and after
-- (done) it runs, and again when it is undone.
CREATE TABLE hosting_steps (
    hosting_id INTEGER NOT NULL REFERENCES hostings(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    step TEXT NOT NULL,
    state TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (hosting_id, step)
);
