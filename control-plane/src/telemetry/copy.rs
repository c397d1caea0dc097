//! PostgreSQL binary `COPY` encoding of staged readings (the fastest way into the server:
//! no text parsing, no per-row statement).
//!
//! Format: the 11-byte signature, flags and header-extension length, then per row the field
//! count and each field as a big-endian length and its binary value, then the `-1` trailer
//! (<https://www.postgresql.org/docs/15/sql-copy.html#id-1.9.3.55.9.4>). Timestamps are
//! microseconds since 2000-01-01 UTC.

use chrono::{DateTime, Utc};
use uuid::Uuid;

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// 2000-01-01T00:00:00Z in Unix seconds.
const PG_EPOCH_UNIX_S: i64 = 946_684_800;

/// Builds one binary COPY body for `kip_sensor_staging (org_id, device_id, epoch, seq,
/// machine, metric, ts, value, quality)`.
#[derive(Debug)]
pub struct StagingRows {
    buf: Vec<u8>,
}

impl StagingRows {
    /// An empty body with room for about `rows` rows.
    pub fn with_capacity(rows: usize) -> Self {
        let mut buf = Vec::with_capacity(19 + rows * 120);
        buf.extend_from_slice(SIGNATURE);
        buf.extend_from_slice(&0i32.to_be_bytes());
        buf.extend_from_slice(&0i32.to_be_bytes());
        Self { buf }
    }

    /// Appends one row.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        org_id: Uuid,
        device_id: Uuid,
        epoch: i64,
        seq: i64,
        machine: &str,
        metric: &str,
        ts: DateTime<Utc>,
        value: f64,
        quality: i16,
    ) {
        let b = &mut self.buf;
        b.extend_from_slice(&9i16.to_be_bytes());
        for id in [org_id, device_id] {
            b.extend_from_slice(&16i32.to_be_bytes());
            b.extend_from_slice(id.as_bytes());
        }
        for n in [epoch, seq] {
            b.extend_from_slice(&8i32.to_be_bytes());
            b.extend_from_slice(&n.to_be_bytes());
        }
        for s in [machine, metric] {
            // Strings are bounded by the batch decoder (far below 2 GiB).
            b.extend_from_slice(&i32::try_from(s.len()).unwrap_or(i32::MAX).to_be_bytes());
            b.extend_from_slice(s.as_bytes());
        }
        b.extend_from_slice(&8i32.to_be_bytes());
        b.extend_from_slice(&pg_micros(ts).to_be_bytes());
        b.extend_from_slice(&8i32.to_be_bytes());
        b.extend_from_slice(&value.to_bits().to_be_bytes());
        b.extend_from_slice(&2i32.to_be_bytes());
        b.extend_from_slice(&quality.to_be_bytes());
    }

    /// The finished body.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }
}

/// Microseconds since 2000-01-01 UTC (years 1 to 9999 fit easily in an i64).
fn pg_micros(ts: DateTime<Utc>) -> i64 {
    (ts.timestamp() - PG_EPOCH_UNIX_S) * 1_000_000 + i64::from(ts.timestamp_subsec_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_count_microseconds_from_the_postgres_epoch() {
        let t = DateTime::<Utc>::from_timestamp(PG_EPOCH_UNIX_S, 0).unwrap();
        assert_eq!(pg_micros(t), 0);
        let t = DateTime::<Utc>::from_timestamp(PG_EPOCH_UNIX_S - 1, 500_000_000).unwrap();
        assert_eq!(pg_micros(t), -500_000);
    }

    #[test]
    fn a_body_has_the_signature_and_the_trailer() {
        let body = StagingRows::with_capacity(0).finish();
        assert_eq!(&body[..11], SIGNATURE);
        assert_eq!(&body[body.len() - 2..], &[0xff, 0xff]);
    }
}
