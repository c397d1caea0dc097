//! Database connection, schema migrations and the platform-admin key bootstrap.
//!
//! Invariants:
//! - Every connection the control plane opens has `statement_timeout` set
//!   (`database.statement_timeout_ms`).
//! - The agent listener has its own small pool ([`agent_pool`]), so ingest keeps connections
//!   however busy the admin API is.
//! - Migrations in `control-plane/migrations/` are applied at every start; sqlx records applied
//!   versions, so a restart (or two replicas starting together: sqlx takes an advisory lock)
//!   applies each migration once.
//! - The platform-admin key is created only when no active platform key exists; its file is
//!   written with mode 0600 before the hash is committed, so a crash never leaves a stored
//!   key whose secret nobody has.

use std::path::Path;

use sqlx::{
    ConnectOptions as _, Connection as _, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::{config::Config, keys};

/// Why the database could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database url: {0}")]
    Url(#[source] sqlx::Error),
    #[error("database url: {0}")]
    Hosts(#[from] crate::db_hosts::HostsError),
    #[error(
        "cannot connect to PostgreSQL at {target}: {source}. Is PostgreSQL running? \
         (Debian: `apt-get install postgresql && pg_ctlcluster 15 main start`)"
    )]
    Connect {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot create database {name:?}: {source}")]
    Create {
        name: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("database name {0:?} may only contain letters, digits and '_'")]
    BadName(String),
    #[error("applying migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database query failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("cannot write admin key file {path}: {source}")]
    KeyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The embedded migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connects to the configured database, creating it first when allowed and missing. Every
/// connection runs with `statement_timeout` = `database.statement_timeout_ms`, so no query
/// (a heavy report, a lock wait) holds a connection longer.
///
/// A URL with several hosts (or `target_session_attrs=read-write`) connects to the first
/// usable one ([`crate::db_hosts`]).
pub async fn connect(cfg: &Config) -> Result<PgPool, DbError> {
    let hosts = hosts(cfg)?;
    let opts = match hosts.first() {
        Some(only) if !hosts.needs_follower() => only.clone(),
        _ => hosts.select(cfg.database_connect_timeout).await?,
    };
    let target = format!(
        "{}:{}/{}",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().unwrap_or("(default)")
    );
    let pool_opts = PgPoolOptions::new()
        .max_connections(cfg.database_max_connections.get())
        .acquire_timeout(cfg.database_connect_timeout);
    match pool_opts.clone().connect_with(opts.clone()).await {
        Ok(pool) => Ok(pool),
        Err(sqlx::Error::Database(e))
            if e.code().as_deref() == Some("3D000") && cfg.database_create_if_missing =>
        {
            let name = opts.get_database().unwrap_or("kip").to_owned();
            create_database(&opts, &name).await?;
            tracing::info!(database = %name, "created database");
            pool_opts
                .connect_with(opts)
                .await
                .map_err(|source| DbError::Connect { target, source })
        }
        Err(source) => Err(DbError::Connect { target, source }),
    }
}

/// The servers of `database.url`, each with `statement_timeout` set.
pub fn hosts(cfg: &Config) -> Result<crate::db_hosts::Hosts, DbError> {
    let timeout = format!("{}ms", cfg.database_statement_timeout.as_millis());
    Ok(crate::db_hosts::Hosts::parse(&cfg.database_url)?
        .map(|o| o.options([("statement_timeout", timeout.as_str())])))
}

/// The agent listener's pool: `database.agent_max_connections` connections of their own, with
/// `main`'s connection options (so the same database and `statement_timeout`), opened on
/// demand. Admin requests and unauthenticated load use `main` and cannot take these; `None`
/// when the setting is 0 (the agent listener shares `main`).
pub fn agent_pool(cfg: &Config, main: &PgPool) -> Option<PgPool> {
    let n = cfg.database_agent_max_connections;
    (n > 0).then(|| {
        PgPoolOptions::new()
            .max_connections(n)
            .acquire_timeout(cfg.database_connect_timeout)
            // sqlx pings (one round trip) every idle connection it hands out by default; a
            // sync acquires the pool once per statement (about a dozen), so that doubled the
            // round trips of the ingest path (docs/performance.md, "Fleet load"). A
            // connection that died is found by the statement itself, which fails the sync
            // (503): the agent retries the same batch, which is idempotent.
            .test_before_acquire(false)
            .connect_lazy_with((*main.connect_options()).clone())
    })
}

async fn create_database(opts: &PgConnectOptions, name: &str) -> Result<(), DbError> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(DbError::BadName(name.to_owned()));
    }
    let mut conn = opts
        .clone()
        .database("postgres")
        .connect()
        .await
        .map_err(|source| DbError::Create {
            name: name.to_owned(),
            source,
        })?;
    // Identifiers cannot be bound as parameters; the name was checked above to be a plain
    // identifier, and it is quoted.
    let sql = format!("CREATE DATABASE \"{name}\"");
    let res = sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    match res {
        Ok(_) => Ok(()),
        // duplicate_database: another process won the race; that is what we wanted.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => Ok(()),
        Err(source) => Err(DbError::Create {
            name: name.to_owned(),
            source,
        }),
    }
}

/// Applies pending migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Creates the platform-admin key if no active one exists and writes it to `path` (0600).
/// Returns `true` when a key was created.
pub async fn ensure_admin_key(pool: &PgPool, path: &Path) -> Result<bool, DbError> {
    let mut tx = pool.begin().await?;
    // Serialises concurrent starts: only one process may create the first admin key.
    sqlx::query("SELECT pg_advisory_xact_lock(727001)")
        .execute(&mut *tx)
        .await?;
    let existing: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM api_keys WHERE scope = 'platform' AND revoked_at IS NULL",
    )
    .fetch_one(&mut *tx)
    .await?;
    if existing > 0 {
        return Ok(false);
    }
    let key = keys::generate();
    write_secret_file(path, &key.key).map_err(|source| DbError::KeyFile {
        path: path.display().to_string(),
        source,
    })?;
    sqlx::query(
        "INSERT INTO api_keys (id, org_id, scope, name, prefix, key_sha256, role) \
         VALUES ($1, NULL, 'platform', 'platform-admin', $2, $3, 'platform-admin')",
    )
    .bind(uuid::Uuid::new_v4())
    .bind(&key.prefix)
    .bind(&key.sha256[..])
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Revokes every platform-admin key and writes a new one to `path` (0600): the recovery when
/// the admin key file was lost (`kip-control-plane --reset-admin-key`).
pub async fn reset_admin_key(pool: &PgPool, path: &Path) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE api_keys SET revoked_at = now() WHERE scope = 'platform' AND revoked_at IS NULL",
    )
    .execute(pool)
    .await?;
    ensure_admin_key(pool, path).await?;
    Ok(())
}

/// Writes `contents` to `path` with mode 0600, creating parent directories (0700).
pub fn write_secret_file(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::{
        io::Write as _,
        os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
