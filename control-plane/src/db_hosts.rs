//! Multi-host database URLs and following the primary after a PostgreSQL failover.
//!
//! `database.url` may name several servers the way libpq does:
//! `postgres://kip@db1:5432,db2:5432/kip?target_session_attrs=read-write`. sqlx connects to
//! one host only (its URL parser takes one `host:port`), so the control plane splits the list
//! into one set of connect options per host ([`Hosts::parse`]) and chooses among them itself:
//!
//! - At start, and whenever the pools need a new target, the hosts are tried in the order
//!   given; the first one that accepts a connection wins, and with
//!   `target_session_attrs=read-write` (or `primary`) only if it is not in recovery
//!   (`pg_is_in_recovery()` false): a streaming standby is skipped.
//! - With more than one host or a read-write target, a tracked task ([`spawn_follower`])
//!   checks the current target every `database.failover_check_interval_ms` through the main
//!   pool. When the check fails (the server is gone) or finds a server in recovery, it chooses
//!   again and points every pool at the new primary (`Pool::set_connect_options`): new
//!   connections go there, connections to the dead server fail and are dropped by the pool.
//!   Requests in between fail (the agent sync answers 5xx; agents keep their records and
//!   retry), so a failover loses nothing that was acknowledged, provided the new primary has
//!   every committed transaction (see docs/operations.md, "PostgreSQL failover").
//! - Invariant: the pools only ever switch to a server that answered as read-write (when
//!   asked for), never to a standby.
//!
//! Limit: a server demoted while alive (not restarted) keeps the pool's open connections to
//! it until they fail or reach their lifetime; a failover stops the old primary.

use std::{str::FromStr as _, time::Duration};

use sqlx::{
    ConnectOptions as _, Connection as _, PgPool,
    postgres::{PgConnectOptions, PgConnection},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Why `database.url` does not name a usable set of servers.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("{0} is not a postgres:// URL")]
    Scheme(String),
    #[error("the URL names an empty host in its host list")]
    EmptyHost,
    #[error("target_session_attrs={0:?} is not supported (use any, read-write or primary)")]
    SessionAttrs(String),
    #[error("host {host}: {source}")]
    Url {
        host: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("no server of {hosts} accepted a {wanted} connection: {detail}")]
    NoneUsable {
        hosts: String,
        wanted: &'static str,
        detail: String,
    },
}

/// The servers of `database.url`, in the order to try them.
#[derive(Debug, Clone)]
pub struct Hosts {
    candidates: Vec<PgConnectOptions>,
    read_write: bool,
}

impl Hosts {
    /// Splits a (possibly multi-host) URL into one set of options per host; removes
    /// `target_session_attrs`, which sqlx would ignore.
    pub fn parse(url: &str) -> Result<Self, HostsError> {
        let (scheme, rest) = url
            .split_once("://")
            .filter(|(s, _)| *s == "postgres" || *s == "postgresql")
            .ok_or_else(|| HostsError::Scheme(redact(url)))?;
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (format!("{u}@"), h),
            None => (String::new(), authority),
        };
        let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
        let mut read_write = false;
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("target_session_attrs", v)) => {
                    read_write = match v {
                        "any" => false,
                        "read-write" | "primary" => true,
                        other => return Err(HostsError::SessionAttrs(other.to_owned())),
                    };
                }
                _ => kept.push(pair),
            }
        }
        let query = if kept.is_empty() {
            String::new()
        } else {
            format!("?{}", kept.join("&"))
        };
        let mut candidates = Vec::new();
        for host in hosts.split(',') {
            if host.is_empty() && hosts.contains(',') {
                return Err(HostsError::EmptyHost);
            }
            let one = format!("{scheme}://{userinfo}{host}{path}{query}");
            let opts = PgConnectOptions::from_str(&one).map_err(|source| HostsError::Url {
                host: host.to_owned(),
                source,
            })?;
            candidates.push(opts);
        }
        Ok(Self {
            candidates,
            read_write,
        })
    }

    /// Whether a follower is worth running: several servers, or a read-write target.
    pub fn needs_follower(&self) -> bool {
        self.candidates.len() > 1 || self.read_write
    }

    /// Applies `f` to every candidate (e.g. `statement_timeout`).
    pub fn map(mut self, f: impl Fn(PgConnectOptions) -> PgConnectOptions) -> Self {
        self.candidates = self.candidates.into_iter().map(f).collect();
        self
    }

    /// The first candidate (the only one of a single-host URL).
    pub fn first(&self) -> Option<&PgConnectOptions> {
        self.candidates.first()
    }

    /// `host:port` of every candidate, for messages.
    pub fn describe(&self) -> String {
        self.candidates
            .iter()
            .map(target)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The first server, in order, that accepts a connection within `timeout` (and is not in
    /// recovery when a read-write target was asked for). A server whose database does not
    /// exist yet counts as usable: the caller may create it.
    pub async fn select(&self, timeout: Duration) -> Result<PgConnectOptions, HostsError> {
        let mut detail = Vec::new();
        for opts in &self.candidates {
            match tokio::time::timeout(timeout, usable(opts, self.read_write)).await {
                Ok(Ok(())) => return Ok(opts.clone()),
                Ok(Err(e)) => detail.push(format!("{}: {e}", target(opts))),
                Err(_) => detail.push(format!("{}: no answer within {timeout:?}", target(opts))),
            }
        }
        Err(HostsError::NoneUsable {
            hosts: self.describe(),
            wanted: if self.read_write { "read-write" } else { "any" },
            detail: detail.join("; "),
        })
    }
}

/// `host:port` of `opts`.
pub fn target(opts: &PgConnectOptions) -> String {
    format!("{}:{}", opts.get_host(), opts.get_port())
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(a)) if a > s => format!("{}://...@{}", &url[..s], &url[a + 1..]),
        _ => url.to_owned(),
    }
}

#[derive(Debug, thiserror::Error)]
enum Unusable {
    #[error(transparent)]
    Connect(#[from] sqlx::Error),
    #[error("in recovery (a standby)")]
    Standby,
}

async fn usable(opts: &PgConnectOptions, read_write: bool) -> Result<(), Unusable> {
    let mut conn: PgConnection = match opts.connect().await {
        Ok(c) => c,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let standby = if read_write {
        sqlx::query_scalar::<_, bool>("SELECT pg_is_in_recovery()")
            .fetch_one(&mut conn)
            .await
    } else {
        Ok(false)
    };
    let _ = conn.close().await;
    if standby? {
        return Err(Unusable::Standby);
    }
    Ok(())
}

/// Starts the task that keeps `pools` on the primary (see the module docs); `pools[0]` is the
/// one checked. Does nothing for a single host without a read-write target.
pub fn spawn_follower(
    hosts: Hosts,
    pools: Vec<PgPool>,
    interval: Duration,
    connect_timeout: Duration,
    token: CancellationToken,
    tracker: &TaskTracker,
) {
    if !hosts.needs_follower() {
        return;
    }
    let Some(main) = pools.first().cloned() else {
        return;
    };
    tracker.spawn(async move {
        loop {
            tokio::select! {
                () = token.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            let check = tokio::time::timeout(
                connect_timeout,
                sqlx::query_scalar::<_, bool>("SELECT pg_is_in_recovery()").fetch_one(&main),
            )
            .await;
            let why = match check {
                Ok(Ok(false)) => continue,
                Ok(Ok(true)) => "the server is in recovery".to_owned(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {connect_timeout:?}"),
            };
            let current = target(&main.connect_options());
            match hosts.select(connect_timeout).await {
                Ok(next) if target(&next) != current => {
                    tracing::warn!(from = %current, to = %target(&next), reason = %why,
                        "database failover: following the new primary");
                    for p in &pools {
                        p.set_connect_options(next.clone());
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(current = %current, reason = %why, error = %e,
                        "database unusable and no other server usable yet");
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    #[test]
    fn a_multi_host_url_becomes_one_target_per_host_in_order() {
        let h = Hosts::parse(
            "postgres://kip:pw@db1:5433,db2/kip?sslmode=disable&target_session_attrs=read-write",
        )
        .unwrap();
        assert_eq!(h.describe(), "db1:5433,db2:5432");
        assert!(h.read_write && h.needs_follower());
        let first = h.first().unwrap();
        assert_eq!(first.get_database(), Some("kip"));
        assert_eq!(first.get_username(), "kip");
    }

    #[test]
    fn a_single_host_url_needs_no_follower() {
        let h = Hosts::parse("postgres://u@h:5432/kip").unwrap();
        assert_eq!(h.describe(), "h:5432");
        assert!(!h.needs_follower());
        assert!(
            Hosts::parse("postgres://u@h/kip?target_session_attrs=primary")
                .unwrap()
                .needs_follower()
        );
    }

    #[test]
    fn bad_urls_are_refused_naming_the_problem() {
        let e = Hosts::parse("mysql://u:secret@h/kip")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not a postgres://") && !e.contains("secret"),
            "{e}"
        );
        let e = Hosts::parse("postgres://u@h/kip?target_session_attrs=standby")
            .unwrap_err()
            .to_string();
        assert!(e.contains("standby"), "{e}");
        assert!(matches!(
            Hosts::parse("postgres://u@a,,b/kip"),
            Err(HostsError::EmptyHost)
        ));
    }
}
