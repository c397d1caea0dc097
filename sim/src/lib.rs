//! `kip-sim`: a simulated AIX Aleph machine for demos and end-to-end checks.
//!
//! It replays run-to-failure trajectories from a NASA C-MAPSS training file: each simulated
//! machine replays one engine unit, one cycle per tick, and publishes every channel
//! (`setting1..3`, `s1..s21`) as JSON `{"v": value, "ts": epoch_ms}` on
//! `<prefix>/<machine>/<channel>`. The channel names are the ones `kip_ml::cmapss` and the
//! agent's feature code use, so the replayed data can feed the reference RUL model.
//!
//! Invariant: the replay is deterministic for a given file and unit list; only `ts` varies.

use kip_ml::cmapss::Engine;

/// Channel names in the order of [`Engine::rows`] values.
pub const CHANNELS: [&str; 24] = [
    "setting1", "setting2", "setting3", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9",
    "s10", "s11", "s12", "s13", "s14", "s15", "s16", "s17", "s18", "s19", "s20", "s21",
];

/// One message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: String,
    pub payload: String,
}

/// Name of the `i`-th simulated machine (0-based): `aleph-01`, `aleph-02`, ...
pub fn machine_name(i: usize) -> String {
    format!("aleph-{:02}", i + 1)
}

/// The messages for `cycle` (0-based, wrapping around the engine's run) of `engine`
/// replayed as `machine`, stamped with `ts_ms`.
pub fn cycle_messages(
    prefix: &str,
    machine: &str,
    engine: &Engine,
    cycle: usize,
    ts_ms: i64,
) -> Vec<Message> {
    let Some(row) = engine.rows.get(cycle % engine.rows.len().max(1)) else {
        return Vec::new();
    };
    CHANNELS
        .iter()
        .zip(row.iter())
        .map(|(channel, v)| Message {
            topic: format!("{prefix}/{machine}/{channel}"),
            payload: serde_json::json!({ "v": f64::from(*v), "ts": ts_ms }).to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cycle_becomes_one_json_message_per_channel() {
        let engines = kip_ml::cmapss::parse(
            "1 1 -0.0007 -0.0004 100.0 518.67 641.82 1589.70 1400.60 14.62 21.61 554.36 \
             2388.06 9046.19 1.30 47.47 521.66 2388.02 8138.62 8.4195 0.03 392 2388 100.00 \
             39.06 23.4190\n",
        )
        .unwrap();
        let msgs = cycle_messages("aleph", "aleph-01", &engines[0], 0, 1_700_000_000_000);
        assert_eq!(msgs.len(), 24);
        assert_eq!(msgs[3].topic, "aleph/aleph-01/s1");
        let v: serde_json::Value = serde_json::from_str(&msgs[3].payload).unwrap();
        assert!((v["v"].as_f64().unwrap() - 518.67).abs() < 1e-3);
        assert_eq!(v["ts"], 1_700_000_000_000i64);
    }

    #[test]
    fn the_replay_wraps_around_at_the_end_of_a_run() {
        let engines = kip_ml::cmapss::parse(
            "1 1 0 0 100 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1\n\
             1 2 0 0 100 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2\n",
        )
        .unwrap();
        let third = cycle_messages("p", "m", &engines[0], 2, 0);
        let first = cycle_messages("p", "m", &engines[0], 0, 0);
        assert_eq!(third, first);
        assert_eq!(machine_name(0), "aleph-01");
    }
}
