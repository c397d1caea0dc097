//! PostgreSQL fixtures.
//!
//! - [`TestDb`]: a fresh database on the shared server (`DATABASE_URL`, default
//!   `postgres://postgres@127.0.0.1:5432/postgres`), with the control plane's migrations
//!   applied, dropped (`WITH (FORCE)`) on drop. For tests that cannot use `#[sqlx::test]`
//!   (e.g. a control-plane child process needs the database URL).
//! - [`NewDatabase`]: the name and URL of a database a process under test creates itself,
//!   dropped on drop.
//! - [`PrivatePostgres`]: a server of the test's own (`initdb` + `pg_ctl` as user `postgres`)
//!   that a test may crash and restart. Needs root (CI and `scripts/test.sh` run as root).
//!   [`PrivatePostgres::standby_of`] makes a streaming-replication standby of one
//!   (`pg_basebackup -R`), [`PrivatePostgres::promote`] turns it into a primary: a failover.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use sqlx::{Executor as _, PgPool};
use uuid::Uuid;

use crate::free_port;

/// The shared server's URL (a database on it that always exists).
pub fn server_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `url` with its database name replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// A fresh, migrated database; dropped when this value is dropped.
#[derive(Debug)]
pub struct TestDb {
    /// The database's name (`kip_test_<uuid>`).
    pub name: String,
    /// Its URL.
    pub url: String,
    /// A pool on it.
    pub pool: PgPool,
    admin_url: String,
}

impl TestDb {
    /// Creates the database and applies `kip_control_plane::db::MIGRATOR`.
    pub async fn create() -> Self {
        let db = Self::create_empty().await;
        kip_control_plane::db::MIGRATOR
            .run(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("migrating {}: {e}", db.name));
        db
    }

    /// Creates an empty database (no migrations).
    pub async fn create_empty() -> Self {
        let admin_url = server_url();
        let name = format!("kip_test_{}", Uuid::new_v4().simple());
        let admin = PgPool::connect(&admin_url).await.unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is not reachable at {admin_url} ({e}): start it (scripts/test.sh \
                 does) or set DATABASE_URL"
            )
        });
        // The name is ours (a uuid), not outside input.
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        admin.close().await;
        let url = with_database(&admin_url, &name);
        let pool = PgPool::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        Self {
            name,
            url,
            pool,
            admin_url,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        drop_database(&self.admin_url, &self.name);
    }
}

/// The name and URL of a database that does not exist yet, for a process under test that
/// creates it (the control plane's first start); dropped, if it exists, when this value is.
#[derive(Debug)]
pub struct NewDatabase {
    /// The database's name (`kip_test_<uuid>`).
    pub name: String,
    /// Its URL on the shared server.
    pub url: String,
    admin_url: String,
}

impl NewDatabase {
    /// A fresh name on the shared server ([`server_url`]).
    pub fn new() -> Self {
        let admin_url = server_url();
        let name = format!("kip_test_{}", Uuid::new_v4().simple());
        Self {
            url: with_database(&admin_url, &name),
            name,
            admin_url,
        }
    }
}

impl Default for NewDatabase {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NewDatabase {
    fn drop(&mut self) {
        drop_database(&self.admin_url, &self.name);
    }
}

/// `DROP DATABASE IF EXISTS name WITH (FORCE)` on `admin_url`; returns once it is gone.
fn drop_database(admin_url: &str, name: &str) {
    // Drop is synchronous and may run on the test's runtime thread: drop the database from a
    // thread with its own runtime, and wait for it so the database is gone when drop returns.
    // A test's pool is not closed here (its connections belong to the test's runtime, which
    // is blocked here: awaiting them would deadlock); `WITH (FORCE)` ends them.
    let (admin_url, name) = (admin_url.to_owned(), name.to_owned());
    let done = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            if let Ok(admin) = PgPool::connect(&admin_url).await {
                let _ = admin
                    .execute(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .await;
                admin.close().await;
            }
        });
    });
    let _ = done.join();
}

/// A private PostgreSQL server (its own data folder and port), stopped on drop.
#[derive(Debug)]
pub struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl PrivatePostgres {
    /// Creates a cluster with `initdb` (trust auth, user `postgres`) and starts it. Panics with
    /// the reason when this process cannot run one (not root, no PostgreSQL 15 binaries).
    pub fn create() -> Self {
        let uid = Command::new("id").arg("-u").output().unwrap();
        assert!(
            String::from_utf8_lossy(&uid.stdout).trim() == "0",
            "a private PostgreSQL needs root (to run it as user postgres); CI and \
             scripts/test.sh run as root"
        );
        let bin = PathBuf::from("/usr/lib/postgresql/15/bin");
        assert!(
            bin.join("initdb").exists(),
            "{} has no initdb: apt-get install postgresql-15",
            bin.display()
        );
        let pg = Self::empty(bin);
        sh(&format!(
            "su postgres -c '{}/initdb -D {} -A trust -U postgres' >/dev/null",
            pg.bin.display(),
            pg.data.display()
        ));
        pg.start();
        pg
    }

    /// A new data folder owned by `postgres` (not initialised) and a free port.
    fn empty(bin: PathBuf) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        sh(&format!(
            "chmod 755 {d} && mkdir -m 700 {data} && chown postgres {data}",
            d = dir.path().display(),
            data = data.display()
        ));
        Self {
            bin,
            data,
            port: free_port(),
            _dir: dir,
        }
    }

    /// A streaming-replication standby of `primary` (`pg_basebackup -R`: a copy of its data
    /// that follows its WAL, read-only), started and connected. The primary's defaults
    /// (`wal_level = replica`, trust for local replication connections) allow it.
    pub fn standby_of(primary: &Self) -> Self {
        let pg = Self::empty(primary.bin.clone());
        sh(&format!(
            "su postgres -c '{}/pg_basebackup -h 127.0.0.1 -p {} -U postgres -D {} -R -X stream' \
             >/dev/null",
            pg.bin.display(),
            primary.port,
            pg.data.display()
        ));
        pg.start();
        pg
    }

    /// Promotes a standby to a primary and waits until it accepts writes.
    pub fn promote(&self) {
        self.ctl("-w promote");
    }

    /// Stops the server cleanly (`-m fast`): sessions are ended, and a standby connected to
    /// it receives every WAL record up to the shutdown checkpoint before it exits.
    pub fn stop_fast(&self) {
        self.ctl("-w -m fast stop");
    }

    fn ctl(&self, args: &str) {
        sh(&format!(
            "su postgres -c \"{}/pg_ctl -D {} {args}\" >/dev/null",
            self.bin.display(),
            self.data.display()
        ));
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) {
        self.ctl(&format!(
            "-w -l {}/log -o '-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}' start",
            self.data.display(),
            self.port,
            self.data.display()
        ));
    }

    /// Stops the server like a crash: no shutdown checkpoint, every connection cut.
    pub fn stop_immediate(&self) {
        self.ctl("-w -m immediate stop");
    }

    /// Crashes the server: `kill -9` of the postmaster and every process it started (one
    /// process group: `pg_ctl` starts the postmaster in its own session), so nothing is sent
    /// to a standby or written to disk afterwards, like a power cut that spares the disk.
    /// Returns when every process of the group is gone.
    pub fn kill_9(&self) {
        let pid = self.postmaster_pid();
        let pgid = Command::new("ps")
            .args(["-o", "pgid=", "-p", &pid.to_string()])
            .output()
            .unwrap();
        let pgid: u32 = String::from_utf8_lossy(&pgid.stdout)
            .trim()
            .parse()
            .unwrap();
        // Never this test's own group: only a postmaster that leads its own session.
        assert_eq!(pgid, pid, "the postmaster does not lead its process group");
        let killed = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .status()
            .unwrap();
        assert!(killed.success(), "kill -KILL -{pgid}");
        let gone = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while Command::new("kill")
            .args(["-0", "--", &format!("-{pgid}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            assert!(
                std::time::Instant::now() < gone,
                "the killed server lingers"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// The postmaster's process id (first line of `postmaster.pid`).
    pub fn postmaster_pid(&self) -> u32 {
        let s = std::fs::read_to_string(self.data.join("postmaster.pid")).unwrap();
        s.lines().next().unwrap().trim().parse().unwrap()
    }

    /// URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `127.0.0.1:PORT`, for a multi-host URL.
    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn sh(cmd: &str) {
    let ok = Command::new("sh")
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("sh: {e}"));
    assert!(ok.success(), "failed: {cmd}");
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // pg_ctl daemonises the server (its own session): stop it by its data folder.
        let _ = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "su postgres -c \"{}/pg_ctl -D {} -m immediate stop\" >/dev/null 2>&1",
                    self.bin.display(),
                    self.data.display()
                ),
            ])
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_gets_its_database_replaced() {
        assert_eq!(
            with_database("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h/postgres?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
    }

    #[tokio::test]
    async fn a_test_database_is_migrated_and_dropped() {
        let db = TestDb::create().await;
        let name = db.name.clone();
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM organisations")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(n, 0);
        drop(db);
        let admin = PgPool::connect(&server_url()).await.unwrap();
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
            .bind(&name)
            .fetch_one(&admin)
            .await
            .unwrap();
        assert_eq!(left, 0, "{name} survived");
    }
}
