//! store: the sqlx pool and every SQL statement of webhoster.
//!
//! One `sqlx::AnyPool` over SQLite (the embedded default, WAL, foreign keys on,
//! busy timeout) or PostgreSQL (when the URL says `postgres://`). The SQL is
//! portable (`$n` parameters, `RETURNING`, text timestamps), so both backends
//! run the same statements; only the migrations differ (`migrations/<backend>`).
//! Uniqueness (one hosting per user, unique vm_id / IP / MAC / SSH port) is
//! enforced by the database and comes back as [`StoreError::Conflict`].
//! No other module writes SQL; this one never talks to QEMU, the network or HTTP.

mod backups;
mod hostings;
mod users;

use std::path::Path;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Executor};

pub use backups::{Backup, BackupKind, BackupStatus, Consistency};
pub use hostings::{Hosting, NewHosting, StepRecord, StepState, UsedAllocations};
pub use users::{StoredKey, User, UserWithHash};

/// Which unique constraint a write hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    Email,
    Username,
    HostingForUser,
    VmId,
    VmIp,
    Mac,
    SshPort,
    /// The account already has this SSH key.
    SshKey,
    Other,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("connecting to the {backend} database")]
    Connect {
        backend: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("running the database migrations")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("unique constraint hit: {0:?}")]
    Conflict(Conflict),
    #[error("database query {0}")]
    Query(&'static str, #[source] sqlx::Error),
    #[error("unreadable value in column {column}: {value:?}")]
    Corrupt { column: &'static str, value: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// The default database: SQLite in the state dir.
pub fn default_url(state_dir: &Path) -> String {
    format!("sqlite://{}?mode=rwc", state_dir.join("webhoster.db").display())
}

pub(crate) fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Maps a unique violation to the constraint it names; other errors stay query errors.
fn classify(what: &'static str, err: sqlx::Error) -> StoreError {
    if let sqlx::Error::Database(db) = &err
        && db.is_unique_violation()
    {
        // PostgreSQL names the constraint (`hostings_vm_ip_key`), SQLite names
        // the columns in its message (`UNIQUE constraint failed: hostings.vm_ip`).
        let text = format!("{} {}", db.constraint().unwrap_or(""), db.message());
        let conflict = [
            ("email", Conflict::Email),
            ("username", Conflict::Username),
            ("user_id", Conflict::HostingForUser),
            ("vm_id", Conflict::VmId),
            ("vm_ip", Conflict::VmIp),
            ("mac", Conflict::Mac),
            ("ssh_port", Conflict::SshPort),
        ]
        .into_iter()
        .find(|(needle, _)| text.contains(needle))
        .map(|(_, c)| c)
        .unwrap_or(Conflict::Other);
        return StoreError::Conflict(conflict);
    }
    StoreError::Query(what, err)
}

impl Store {
    /// Connects and runs the embedded migrations.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        install_default_drivers();
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        };
        let connect = |source| StoreError::Connect {
            backend: backend.name(),
            source,
        };
        let max = match backend {
            // SQLite serializes writers anyway; a few readers are enough.
            Backend::Sqlite => 8,
            Backend::Postgres => 16,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(10))
            // A ping per checkout would double the cost of a cheap request.
            .test_before_acquire(false)
            .connect(url)
            .await
            .map_err(connect)?;
        if backend == Backend::Sqlite {
            // WAL is a property of the database file: set once, kept by every
            // connection. Foreign keys and the busy timeout are sqlx defaults.
            pool.execute("PRAGMA journal_mode = WAL").await.map_err(connect)?;
        }
        let migrator = match backend {
            Backend::Sqlite => &SQLITE_MIGRATOR,
            Backend::Postgres => &POSTGRES_MIGRATOR,
        };
        migrator.run(&pool).await.map_err(StoreError::Migrate)?;
        Ok(Store { pool, backend })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A cheap round trip, for health checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(|e| StoreError::Query("ping", e))?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
