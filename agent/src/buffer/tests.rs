use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use kip_shared::{Gap, Prediction, Quality, Reading};
use proptest::prelude::*;

use super::*;

fn ts(s: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
}

fn reading(i: u64, pad: usize) -> Record {
    Record::Reading(Reading {
        source: "mqtt1".into(),
        machine: format!("m{}", "x".repeat(pad)),
        metric: "temp".into(),
        ts: ts(i as i64),
        value: i as f64,
        quality: Quality::Good,
    })
}

fn prediction(i: u64) -> Record {
    Record::Prediction(Prediction {
        machine: "m1".into(),
        model_version: "v1".into(),
        ts: ts(i as i64),
        rul_cycles: i as f64,
        anomaly_score: Some(0.5),
        model: None,
        role: None,
    })
}

fn gap(i: u64) -> Record {
    Record::Gap(Gap {
        source: "mqtt1".into(),
        from: ts(i as i64),
        to: ts(i as i64 + 1),
        reason: "reconnect".into(),
    })
}

fn dead_letter(i: u64) -> Record {
    Record::DeadLetter(DeadLetter {
        source: "mqtt1".into(),
        origin: "a/b".into(),
        reason: "not a number".into(),
        payload_prefix: b"oops".to_vec(),
        ts: ts(i as i64),
    })
}

fn big() -> BufferOptions {
    BufferOptions::with_max_bytes(u64::MAX / 2)
}

/// Opens again after a drop in the same process. sled may finish background log writes on
/// its thread pool just after the handle is dropped, holding the file lock for a moment.
fn reopen(path: &Path, opts: BufferOptions) -> Buffer {
    for _ in 0..200 {
        match Buffer::open(path, opts.clone()) {
            Err(BufferError::Locked { .. }) => std::thread::sleep(Duration::from_millis(10)),
            other => return other.unwrap(),
        }
    }
    panic!("buffer {} still locked after 2 s", path.display())
}

fn all(buf: &Buffer) -> Vec<Sequenced> {
    buf.read_range(0, usize::MAX, u64::MAX).unwrap()
}

#[test]
fn appends_get_strictly_increasing_seqs_and_read_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let buf = Buffer::open(dir.path(), big()).unwrap();
    let recs = [
        reading(1, 0),
        prediction(2),
        gap(3),
        reading(4, 0),
        dead_letter(5),
    ];
    let seqs: Vec<u64> = recs.iter().map(|r| buf.append(r).unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    let got = all(&buf);
    assert_eq!(got.iter().map(|s| s.seq).collect::<Vec<_>>(), seqs);
    assert_eq!(
        got.iter().map(|s| s.record.clone()).collect::<Vec<_>>(),
        recs
    );
    assert!(got.iter().all(|s| s.epoch == buf.epoch()));

    let newest = buf.read_newest(2).unwrap();
    assert_eq!(newest.iter().map(|s| s.seq).collect::<Vec<_>>(), vec![4, 5]);
    assert_eq!(buf.read_newest(50).unwrap().len(), 5);

    let from3 = buf.read_range(3, 2, u64::MAX).unwrap();
    assert_eq!(from3.iter().map(|s| s.seq).collect::<Vec<_>>(), vec![3, 4]);

    let stats = buf.stats().unwrap();
    assert_eq!(stats.counts.reading, 2);
    assert_eq!(stats.counts.prediction, 1);
    assert_eq!(stats.counts.gap, 1);
    assert_eq!(stats.counts.dead_letter, 1);
    assert_eq!(stats.oldest.unwrap().seq, 1);
    let newest = stats.newest.unwrap();
    assert_eq!((newest.seq, newest.kind), (5, RecordKind::DeadLetter));
    assert_eq!(newest.ts, ts(5));
    assert!(stats.oldest_unacked_age_ms.is_some());
    assert_eq!(stats.next_seq, 6);
}

#[test]
fn read_range_respects_the_byte_limit_but_always_returns_one_record() {
    let dir = tempfile::tempdir().unwrap();
    let buf = Buffer::open(dir.path(), big()).unwrap();
    for i in 0..10 {
        buf.append(&reading(i, 100)).unwrap();
    }
    assert_eq!(buf.read_range(1, 100, 1).unwrap().len(), 1);
    let some = buf.read_range(1, 100, 700).unwrap();
    assert!((2..10).contains(&some.len()), "{}", some.len());
    assert!(buf.read_range(11, 100, u64::MAX).unwrap().is_empty());
}

#[test]
fn reopen_after_drop_keeps_everything_and_seq_continues_increasing() {
    let dir = tempfile::tempdir().unwrap();
    let buf = Buffer::open(dir.path(), big()).unwrap();
    let epoch = buf.epoch();
    for i in 0..5 {
        buf.append(&reading(i, 0)).unwrap();
    }
    buf.append(&prediction(9)).unwrap();
    let before = all(&buf);
    drop(buf);

    let buf = reopen(dir.path(), big());
    assert_eq!(buf.epoch(), epoch);
    assert_eq!(all(&buf), before);
    assert_eq!(buf.append(&reading(10, 0)).unwrap(), 7);
    // Acknowledge everything: nothing is left on disk, yet sequences must not restart.
    buf.ack(7).unwrap();
    assert!(all(&buf).is_empty());
    drop(buf);

    let buf = reopen(dir.path(), big());
    assert_eq!(buf.append(&reading(11, 0)).unwrap(), 8);
    assert_eq!(buf.stats().unwrap().acked_up_to, 7);
}

#[test]
fn a_recreated_buffer_gets_a_new_higher_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buf");
    let first = Buffer::open(&path, big()).unwrap().epoch();
    std::fs::remove_dir_all(&path).unwrap();
    let mut opts = big();
    opts.min_epoch = first + 1_000_000;
    let second = Buffer::open(&path, opts).unwrap().epoch();
    assert!(second > first, "{second} > {first}");
    assert_eq!(second, first + 1_000_000);
}

#[test]
fn ack_deletes_up_to_and_including_the_sequence_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let buf = Buffer::open(dir.path(), big()).unwrap();
    for i in 0..6 {
        if i % 2 == 0 {
            buf.append(&reading(i, 0)).unwrap();
        } else {
            buf.append(&gap(i)).unwrap();
        }
    }
    assert_eq!(buf.ack(3).unwrap(), 3);
    assert_eq!(
        all(&buf).iter().map(|s| s.seq).collect::<Vec<_>>(),
        vec![4, 5, 6]
    );
    assert_eq!(buf.ack(3).unwrap(), 0);
    assert_eq!(buf.ack(2).unwrap(), 0);
    let err = buf.ack(7).unwrap_err();
    assert!(
        matches!(
            err,
            BufferError::AckBeyondEnd {
                requested: 7,
                issued: 6
            }
        ),
        "{err}"
    );
    let stats = buf.stats().unwrap();
    assert_eq!(stats.counts.total(), 3);
    assert_eq!(stats.oldest.unwrap().seq, 4);
    assert_eq!(buf.ack(6).unwrap(), 3);
    let stats = buf.stats().unwrap();
    assert_eq!((stats.counts.total(), stats.bytes), (0, 0));
    assert!(stats.oldest.is_none() && stats.oldest_unacked_age_ms.is_none());
}

#[test]
fn a_full_buffer_evicts_the_oldest_readings_only_and_writes_a_loss_record() {
    let dir = tempfile::tempdir().unwrap();
    let buf = Buffer::open(dir.path(), BufferOptions::with_max_bytes(20_000)).unwrap();
    buf.append(&prediction(0)).unwrap();
    buf.append(&dead_letter(0)).unwrap();
    for i in 0..200 {
        buf.append(&reading(i, 50)).unwrap();
        if i % 20 == 0 {
            buf.append(&gap(i)).unwrap();
        }
        if i % 50 == 0 {
            buf.append(&prediction(i)).unwrap();
        }
    }
    let stats = buf.stats().unwrap();
    assert!(
        stats.bytes <= 20_000 + LOSS_RECORD_RESERVE_BYTES,
        "{}",
        stats.bytes
    );
    assert!(stats.evicted_records_total > 0);
    let stored = all(&buf);
    // Every non-reading ever appended is still there.
    let kept = |k: RecordKind| stored.iter().filter(|s| s.record.kind() == k).count();
    assert_eq!(kept(RecordKind::Prediction), 5);
    assert_eq!(kept(RecordKind::DeadLetter), 1);
    // The loss records account for exactly the evicted readings, and those are the oldest.
    let losses: Vec<&Loss> = stored
        .iter()
        .filter_map(|s| match &s.record {
            Record::Loss(l) => Some(l),
            _ => None,
        })
        .collect();
    assert!(!losses.is_empty());
    assert_eq!(
        losses.iter().map(|l| l.records).sum::<u64>(),
        stats.evicted_records_total
    );
    let oldest_kept_reading = stored
        .iter()
        .find(|s| s.record.kind() == RecordKind::Reading)
        .unwrap()
        .seq;
    assert!(losses.iter().all(|l| l.last_seq < oldest_kept_reading));
    assert_eq!(stats.counts.loss as usize, losses.len());
}

#[test]
fn a_buffer_full_of_unevictable_records_rejects_and_records_the_loss_once_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    let buf = Buffer::open(dir.path(), BufferOptions::with_max_bytes(2_000)).unwrap();
    let mut last = 0;
    let mut rejected = Vec::new();
    for i in 0..40 {
        match buf.append(&prediction(i)) {
            Ok(s) => last = s,
            Err(BufferError::Full { seq, kind, .. }) => {
                assert_eq!(kind, RecordKind::Prediction);
                rejected.push(seq);
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(!rejected.is_empty());
    assert_eq!(
        buf.stats().unwrap().rejected_records_total,
        rejected.len() as u64
    );
    buf.ack(last).unwrap();
    let stored = all(&buf);
    assert_eq!(stored.len(), 1);
    let Record::Loss(loss) = &stored[0].record else {
        panic!("{stored:?}")
    };
    assert_eq!(loss.records, rejected.len() as u64);
    assert_eq!(loss.first_seq, rejected[0]);
    assert_eq!(loss.last_seq, *rejected.last().unwrap());
    assert!(stored[0].seq > loss.last_seq);
}

#[test]
fn a_second_open_of_the_same_buffer_says_it_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _buf = Buffer::open(dir.path(), big()).unwrap();
    let err = Buffer::open(dir.path(), big()).unwrap_err();
    assert!(matches!(err, BufferError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("is the agent running"), "{err}");
}

#[test]
fn a_stored_record_that_no_longer_decodes_is_read_as_a_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let buf = Buffer::open(dir.path(), big()).unwrap();
    buf.append(&reading(1, 0)).unwrap();
    let mut v = encode(&prediction(2), now_ms(), None).unwrap();
    v.truncate(VALUE_HEADER_LEN + 5);
    buf.insert_raw(2, &v);
    buf.append(&reading(3, 0)).unwrap();
    let got = all(&buf);
    assert_eq!(got.len(), 3);
    let Record::DeadLetter(d) = &got[1].record else {
        panic!("{got:?}")
    };
    assert_eq!((d.source.as_str(), d.origin.as_str()), ("buffer", "seq 2"));
    assert!(d.reason.contains("does not decode"), "{}", d.reason);
}

#[tokio::test]
async fn the_flusher_flushes_on_cancel_and_reports_the_durable_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let buf = std::sync::Arc::new(Buffer::open(dir.path(), big()).unwrap());
    for i in 0..3 {
        buf.append(&reading(i, 0)).unwrap();
    }
    let cancel = tokio_util::sync::CancellationToken::new();
    cancel.cancel();
    buf.run_flusher(Duration::from_secs(3600), cancel).await;
    assert_eq!(buf.stats().unwrap().durable_seq, 3);
}

// ---- model check ----

#[derive(Debug, Clone)]
enum Op {
    Append { kind: u8, pad: usize },
    Ack { frac: u8 },
    Read { from_frac: u8, max: usize },
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..8, 0usize..300).prop_map(|(kind, pad)| Op::Append { kind, pad }),
        2 => (0u8..=100).prop_map(|frac| Op::Ack { frac }),
        2 => (0u8..=100, 1usize..20).prop_map(|(from_frac, max)| Op::Read { from_frac, max }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Default)]
struct Model {
    /// Appended, not acknowledged, not (yet observed as) evicted.
    live: BTreeMap<u64, Record>,
    acked_up_to: u64,
    /// Highest sequence issued to an appended record (this or an earlier session).
    max_seq: u64,
    evicted: BTreeSet<u64>,
    evicted_total: u64,
    loss_seen: BTreeMap<u64, Loss>,
    rejected_this_session: u64,
}

fn check(buf: &Buffer, model: &mut Model, max_bytes: u64) {
    let stored = all(buf);
    let seqs: Vec<u64> = stored.iter().map(|s| s.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "not strictly increasing: {seqs:?}"
    );
    assert!(
        seqs.iter().all(|s| *s > model.acked_up_to),
        "acked record still stored"
    );
    let stored_map: BTreeMap<u64, &Record> = stored.iter().map(|s| (s.seq, &s.record)).collect();
    for s in &stored {
        match model.live.get(&s.seq) {
            Some(r) => assert_eq!(&s.record, r, "seq {}", s.seq),
            None => {
                let Record::Loss(l) = &s.record else {
                    panic!("unexpected record at {}: {:?}", s.seq, s.record)
                };
                assert!(l.reason.starts_with("buffer full"), "{}", l.reason);
                model.loss_seen.entry(s.seq).or_insert_with(|| l.clone());
            }
        }
    }
    let gone: Vec<u64> = model
        .live
        .keys()
        .filter(|s| !stored_map.contains_key(s))
        .copied()
        .collect();
    for s in gone {
        let r = model.live.remove(&s).unwrap();
        assert!(r.is_evictable(), "non-evictable record {s} lost: {r:?}");
        model.evicted.insert(s);
        model.evicted_total += 1;
    }
    // Every evicted reading is covered by a loss record's range.
    for s in &model.evicted {
        assert!(
            model
                .loss_seen
                .values()
                .any(|l| l.first_seq <= *s && *s <= l.last_seq && l.reason.contains("evicted")),
            "evicted {s} not covered by a loss record"
        );
    }
    let evicted_by_loss: u64 = model
        .loss_seen
        .values()
        .filter(|l| l.reason.contains("evicted"))
        .map(|l| l.records)
        .sum();
    assert_eq!(evicted_by_loss, model.evicted_total);

    let stats = buf.stats().unwrap();
    assert_eq!(stats.counts.total(), stored.len() as u64);
    for k in RecordKind::ALL {
        let n = stored.iter().filter(|s| s.record.kind() == k).count() as u64;
        assert_eq!(stats.counts.get(k), n, "{k}");
    }
    let stored_bytes: u64 = stored
        .iter()
        .map(|s| FRAME_HEADER_LEN + encode(&s.record, 0, None).unwrap().len() as u64)
        .sum();
    assert_eq!(stats.bytes, stored_bytes);
    assert!(stats.bytes <= max_bytes + LOSS_RECORD_RESERVE_BYTES);
    assert_eq!(stats.oldest.map(|o| o.seq), seqs.first().copied());
    assert_eq!(stats.newest.map(|o| o.seq), seqs.last().copied());
    assert_eq!(stats.acked_up_to, model.acked_up_to);
    assert_eq!(stats.rejected_records_total, model.rejected_this_session);
}

fn model_record(kind: u8, pad: usize, i: u64) -> Record {
    match kind {
        0..=3 => reading(i, pad),
        4 => prediction(i),
        5 => gap(i),
        _ => dead_letter(i),
    }
}

fn run_model(ops: Vec<Op>, max_bytes: u64) {
    let dir = tempfile::tempdir().unwrap();
    let opts = BufferOptions::with_max_bytes(max_bytes);
    let mut buf = Some(Buffer::open(dir.path(), opts.clone()).unwrap());
    let mut model = Model::default();
    let mut last_issued = 0;
    for (i, op) in ops.into_iter().enumerate() {
        let b = buf.as_ref().unwrap();
        match op {
            Op::Append { kind, pad } => {
                let rec = model_record(kind, pad, i as u64);
                match b.append(&rec) {
                    Ok(seq) => {
                        assert!(seq > last_issued && seq > model.max_seq);
                        assert!(seq > model.acked_up_to);
                        last_issued = seq;
                        model.max_seq = seq;
                        model.live.insert(seq, rec);
                    }
                    Err(BufferError::Full { seq, .. }) => {
                        assert!(seq > last_issued);
                        last_issued = seq;
                        model.rejected_this_session += 1;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            Op::Ack { frac } => {
                let next = b.stats().unwrap().next_seq;
                let up_to = (next - 1) * u64::from(frac) / 100;
                b.ack(up_to).unwrap();
                model.acked_up_to = model.acked_up_to.max(up_to);
                model.live.retain(|s, _| *s > model.acked_up_to);
                model.evicted.retain(|s| *s > model.acked_up_to);
            }
            Op::Read { from_frac, max } => {
                let next = b.stats().unwrap().next_seq;
                let from = next * u64::from(from_frac) / 100;
                let got = b.read_range(from, max, u64::MAX).unwrap();
                let expect: Vec<u64> = all(b)
                    .into_iter()
                    .map(|s| s.seq)
                    .filter(|s| *s >= from)
                    .take(max)
                    .collect();
                assert_eq!(got.iter().map(|s| s.seq).collect::<Vec<_>>(), expect);
            }
            Op::Flush => {
                let upto = b.flush_blocking().unwrap();
                assert_eq!(b.stats().unwrap().durable_seq, upto);
            }
            Op::Reopen => {
                drop(buf.take());
                let nb = reopen(dir.path(), opts.clone());
                // Rejected sequences were never stored, so they may be issued again; stored
                // and acknowledged ones never.
                last_issued = model.max_seq.max(model.acked_up_to);
                model.rejected_this_session = 0;
                buf = Some(nb);
            }
        }
        check(buf.as_ref().unwrap(), &mut model, max_bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn buffer_matches_an_in_memory_model_with_room(ops in proptest::collection::vec(op(), 1..80)) {
        run_model(ops, u64::MAX / 2);
    }

    #[test]
    fn buffer_matches_an_in_memory_model_when_full(
        ops in proptest::collection::vec(op(), 1..120),
        max_bytes in 1_500u64..6_000,
    ) {
        run_model(ops, max_bytes);
    }
}

// ---- crash test: a child process appends and flushes, the parent kills it with SIGKILL ----

const CRASH_DIR_ENV: &str = "KIP_BUFFER_CRASH_CHILD_DIR";

/// Child side of the crash test; does nothing unless started by the parent test.
#[test]
#[ignore = "run by records_reported_as_flushed_survive_kill_9"]
fn crash_child() {
    let Ok(dir) = std::env::var(CRASH_DIR_ENV) else {
        return;
    };
    let buf = Buffer::open(Path::new(&dir), big()).unwrap();
    // Leading newline: libtest has just printed "test ... " without one.
    println!("\nepoch {}", buf.epoch());
    let mut i = 0u64;
    loop {
        for _ in 0..25 {
            let rec = if i % 10 == 9 {
                prediction(i)
            } else {
                reading(i, 20)
            };
            buf.append(&rec).unwrap();
            i += 1;
        }
        let upto = buf.flush_blocking().unwrap();
        // Printed only after the flush returned: the parent relies on these lines.
        println!("flushed {upto}");
        // Records appended after this point and before the next flush may be lost on kill.
        for _ in 0..5 {
            buf.append(&reading(i, 20)).unwrap();
            i += 1;
        }
    }
}

#[test]
fn records_reported_as_flushed_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "buffer::tests::crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_DIR_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut epoch = None;
    let mut flushed = 0;
    let mut flushes = 0;
    for line in stdout.lines() {
        let line = line.unwrap();
        if let Some(e) = line.strip_prefix("epoch ") {
            epoch = Some(e.parse::<u64>().unwrap());
        } else if let Some(s) = line.strip_prefix("flushed ") {
            flushed = s.parse::<u64>().unwrap();
            flushes += 1;
            if flushes == 40 {
                break;
            }
        }
    }
    // SIGKILL while the child is appending: no destructor, no final flush.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(flushed > 0, "child never reported a flush");

    let buf = Buffer::open(dir.path(), big()).unwrap();
    assert_eq!(Some(buf.epoch()), epoch);
    let stored = all(&buf);
    let seqs: Vec<u64> = stored.iter().map(|s| s.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "duplicates or disorder"
    );
    assert_eq!(
        seqs[..flushed as usize],
        (1..=flushed).collect::<Vec<_>>()[..]
    );
    let next = buf.append(&reading(0, 0)).unwrap();
    assert!(next > *seqs.last().unwrap());
}

fn delivery(id: u16, payload: &str) -> Delivery {
    Delivery {
        session: "client-1".into(),
        id,
        digest: crate::mqtt::message_digest("t/x", payload.as_bytes()),
        redelivered: true,
    }
}

#[test]
fn delivery_notes_survive_a_reopen_and_match_only_the_same_id_and_content() {
    let dir = tempfile::tempdir().unwrap();
    let buf = Buffer::open(dir.path(), big()).unwrap();
    let a = buf
        .append_delivered(&reading(1, 0), &delivery(7, "1"))
        .unwrap();
    // The same packet id in flight twice (a broker past 65,535 in flight): both are kept.
    let b = buf
        .append_delivered(&reading(2, 0), &delivery(7, "2"))
        .unwrap();
    assert_eq!(buf.delivered(&delivery(7, "1")).unwrap(), Some(a));
    assert_eq!(buf.delivered(&delivery(7, "2")).unwrap(), Some(b));
    assert_eq!(buf.delivered(&delivery(8, "1")).unwrap(), None, "other id");
    assert_eq!(
        buf.delivered(&delivery(7, "3")).unwrap(),
        None,
        "other content"
    );
    let mut other_session = delivery(7, "1");
    other_session.session = "client-2".into();
    assert_eq!(buf.delivered(&other_session).unwrap(), None);
    buf.flush_blocking().unwrap();
    // Synced and deleted records keep their notes: the broker may still redeliver them.
    buf.ack(b).unwrap();
    drop(buf);
    let buf = reopen(dir.path(), big());
    assert_eq!(buf.delivered(&delivery(7, "1")).unwrap(), Some(a));
    assert_eq!(buf.delivery_notes(), 2);
}

#[test]
fn delivery_notes_are_a_bounded_fifo() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = big();
    opts.max_delivery_notes = 100;
    let buf = Buffer::open(dir.path(), opts).unwrap();
    let n = 103;
    for i in 0..n {
        let d = delivery((i % 50) as u16, &i.to_string());
        buf.append_delivered(&reading(i as u64, 0), &d).unwrap();
    }
    assert_eq!(buf.delivery_notes(), 100);
    assert_eq!(
        buf.delivered(&delivery(0, "0")).unwrap(),
        None,
        "oldest dropped"
    );
    assert_eq!(buf.delivered(&delivery(2, "2")).unwrap(), None);
    assert!(buf.delivered(&delivery(3, "3")).unwrap().is_some());
    let last = n - 1;
    assert!(
        buf.delivered(&delivery((last % 50) as u16, &last.to_string()))
            .unwrap()
            .is_some()
    );
}

/// The torn state a crash can leave (issue #19): the record durable, its note cut off. The
/// broker redelivers the unacknowledged message; the note must be found, not a second record.
#[test]
fn a_record_whose_note_was_cut_off_by_a_crash_gets_it_back_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let buf = Buffer::open(dir.path(), big()).unwrap();
    let noted = buf
        .append_delivered(&reading(1, 0), &delivery(1, "1"))
        .unwrap();
    let torn = buf
        .append_delivered_torn(&reading(2, 0), &delivery(2, "2"))
        .unwrap();
    // A record without a note of its own after the cut, and one acked meanwhile.
    let plain = buf.append(&gap(3)).unwrap();
    let torn_later = buf
        .append_delivered_torn(&reading(4, 0), &delivery(4, "4"))
        .unwrap();
    assert_eq!(buf.delivered(&delivery(2, "2")).unwrap(), None, "torn");
    assert_eq!(buf.delivery_notes(), 1);
    buf.flush_blocking().unwrap();
    drop(buf);

    let buf = reopen(dir.path(), big());
    assert_eq!(buf.delivered(&delivery(1, "1")).unwrap(), Some(noted));
    assert_eq!(buf.delivered(&delivery(2, "2")).unwrap(), Some(torn));
    assert_eq!(buf.delivered(&delivery(4, "4")).unwrap(), Some(torn_later));
    assert_eq!(buf.delivery_notes(), 3);
    // The records read back unchanged (format 2 carries the key, format 1 does not).
    let got: Vec<(u64, Record)> = all(&buf).into_iter().map(|s| (s.seq, s.record)).collect();
    assert_eq!(
        got,
        vec![
            (noted, reading(1, 0)),
            (torn, reading(2, 0)),
            (plain, gap(3)),
            (torn_later, reading(4, 0)),
        ]
    );
    // Restored notes are ordinary notes: durable, in the FIFO, and a reopen adds none.
    buf.flush_blocking().unwrap();
    drop(buf);
    let buf = reopen(dir.path(), big());
    assert_eq!(buf.delivery_notes(), 3);
    assert_eq!(buf.delivered(&delivery(2, "2")).unwrap(), Some(torn));
    let next = buf
        .append_delivered(&reading(5, 0), &delivery(5, "5"))
        .unwrap();
    assert!(next > torn_later);
    assert_eq!(buf.delivery_notes(), 4);
}

#[test]
fn restored_notes_respect_the_fifo_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = big();
    opts.max_delivery_notes = 3;
    let buf = Buffer::open(dir.path(), opts.clone()).unwrap();
    for i in 0..5u16 {
        buf.append_delivered_torn(&reading(u64::from(i), 0), &delivery(i, &i.to_string()))
            .unwrap();
    }
    buf.flush_blocking().unwrap();
    drop(buf);
    let buf = reopen(dir.path(), opts);
    assert_eq!(buf.delivery_notes(), 3);
    assert_eq!(
        buf.delivered(&delivery(1, "1")).unwrap(),
        None,
        "oldest dropped"
    );
    assert!(buf.delivered(&delivery(2, "2")).unwrap().is_some());
    assert!(buf.delivered(&delivery(4, "4")).unwrap().is_some());
}

#[test]
fn a_delivered_record_cut_short_is_read_as_a_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let buf = Buffer::open(dir.path(), big()).unwrap();
    let key = delivery_key(&delivery(1, "1"));
    let v = encode(&prediction(1), now_ms(), Some(&key)).unwrap();
    // Cut inside the key: the length prefix points past the end.
    buf.insert_raw(1, &v[..VALUE_HEADER_LEN + 10]);
    let got = all(&buf);
    let Record::DeadLetter(d) = &got[0].record else {
        panic!("{got:?}")
    };
    assert!(d.reason.contains("cut short"), "{}", d.reason);
}

// ---- disk footprint, torn frames, upgrade from sled ----

/// Bytes of every file under `dir`: what the gateway's disk sees.
fn files_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        total += if m.is_dir() {
            files_bytes(&e.path())
        } else {
            m.len()
        };
    }
    total
}

/// The bound the module docs state: cap, loss reserve, the deleted head of one segment per
/// log (plus one record), the notes, `meta`.
fn footprint_bound(opts: &BufferOptions, max_frame: u64, notes: u64) -> u64 {
    opts.max_bytes
        + LOSS_RECORD_RESERVE_BYTES
        + 2 * (opts.segment_bytes() + max_frame)
        + notes
        + 128
}

#[test]
fn the_disk_footprint_stays_within_max_bytes_plus_the_stated_overhead() {
    let dir = tempfile::tempdir().unwrap();
    let opts = BufferOptions::with_max_bytes(256 * 1024);
    let buf = Buffer::open(dir.path(), opts.clone()).unwrap();
    let max_frame = FRAME_HEADER_LEN + 1024;
    let bound = footprint_bound(&opts, max_frame, 0);
    let mut written = 0u64;
    let mut i = 0u64;
    let mut peak = 0;
    // Ten times the cap, all evicted but the newest readings.
    while written < 10 * opts.max_bytes {
        let r = reading(i, 100 + (i % 7) as usize * 20);
        written += entry_bytes(&encode(&r, 0, None).unwrap());
        buf.append(&r).unwrap();
        if i.is_multiple_of(500) {
            buf.append(&gap(i)).unwrap();
        }
        if i.is_multiple_of(100) {
            buf.flush_blocking().unwrap();
            let on_disk = files_bytes(dir.path());
            peak = peak.max(on_disk);
            assert!(
                on_disk <= bound,
                "{on_disk} > {bound} after {written} bytes"
            );
        }
        i += 1;
    }
    let stats = buf.stats().unwrap();
    assert!(stats.evicted_records_total > 0);
    assert!(stats.bytes <= opts.max_bytes + LOSS_RECORD_RESERVE_BYTES);
    // Acknowledging while appending: acknowledged segments go at once.
    let mut acked = 0;
    for round in 0..20 {
        for _ in 0..200 {
            buf.append(&reading(i, 150)).unwrap();
            i += 1;
        }
        let next = buf.stats().unwrap().next_seq;
        acked = (next - 1).min(acked + 3_000);
        buf.ack(acked).unwrap();
        buf.flush_blocking().unwrap();
        let on_disk = files_bytes(dir.path());
        assert!(on_disk <= bound, "{on_disk} > {bound} in ack round {round}");
    }
    let last = buf.stats().unwrap().next_seq - 1;
    buf.ack(last).unwrap();
    buf.flush_blocking().unwrap();
    let idle = files_bytes(dir.path());
    // Back near idle: at most the deleted head of one segment per log.
    assert!(
        idle <= 2 * (opts.segment_bytes() + max_frame) + 128,
        "{idle} bytes left after acknowledging everything"
    );
    // What the buffer reports is what the files take (the lock file is empty).
    assert!(
        buf.disk_bytes().abs_diff(idle) <= 128,
        "{} vs {idle}",
        buf.disk_bytes()
    );
    eprintln!(
        "footprint: cap {} B, peak {peak} B on disk (bound {bound} B), {idle} B when drained",
        opts.max_bytes
    );
}

fn last_segment(log_dir: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(log_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    segs.pop().unwrap()
}

#[test]
fn a_torn_or_corrupt_tail_frame_is_cut_off_and_every_record_before_it_survives() {
    for corrupt_crc in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let buf = Buffer::open(dir.path(), big()).unwrap();
        let mut want = Vec::new();
        for i in 0..50 {
            let r = reading(i, 10);
            want.push((buf.append(&r).unwrap(), r));
        }
        let p = prediction(50);
        let pseq = buf.append(&p).unwrap();
        buf.flush_blocking().unwrap();
        // The last reading's frame is the one a power loss tore (or a bad sector flipped).
        let torn = buf.append(&reading(99, 10)).unwrap();
        drop(buf);
        let seg = last_segment(&dir.path().join(READINGS_DIR));
        let len = std::fs::metadata(&seg).unwrap().len();
        if corrupt_crc {
            let mut bytes = std::fs::read(&seg).unwrap();
            let n = bytes.len();
            bytes[n - 3] ^= 0xff;
            std::fs::write(&seg, bytes).unwrap();
        } else {
            let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
            f.set_len(len - 5).unwrap();
        }

        let buf = reopen(dir.path(), big());
        let got: Vec<(u64, Record)> = all(&buf).into_iter().map(|s| (s.seq, s.record)).collect();
        let mut expect = want.clone();
        expect.push((pseq, p.clone()));
        assert_eq!(got, expect, "corrupt_crc = {corrupt_crc}");
        let frame = entry_bytes(&encode(&reading(99, 10), 0, None).unwrap());
        assert!(std::fs::metadata(&seg).unwrap().len() <= len - frame + 1);
        // The cut record was never durable here, so its sequence may be issued again; the
        // log goes on cleanly from there and a reopen finds the same records.
        let next = buf.append(&reading(100, 10)).unwrap();
        assert_eq!(next, torn);
        drop(buf);
        let buf = reopen(dir.path(), big());
        assert_eq!(all(&buf).len(), expect.len() + 1);
    }
}

#[test]
fn a_sled_buffer_written_by_the_old_agent_is_upgraded_with_its_seqs_epoch_and_notes() {
    let dir = tempfile::tempdir().unwrap();
    let (epoch, acked, kept, noted, gap_seq) = {
        let old =
            sled_v1::Buffer::open(dir.path(), sled_v1::BufferOptions::with_max_bytes(1 << 20))
                .unwrap();
        for i in 0..10 {
            old.append(&reading(i, 5)).unwrap();
        }
        old.ack(4).unwrap();
        let noted = old
            .append_delivered(&reading(10, 5), &delivery(3, "10"))
            .unwrap();
        let gap_seq = old.append(&gap(11)).unwrap();
        old.append(&prediction(12)).unwrap();
        old.flush_blocking().unwrap();
        let kept: Vec<(u64, Record)> = old
            .read_range(0, usize::MAX, u64::MAX)
            .unwrap()
            .into_iter()
            .map(|s| (s.seq, s.record))
            .collect();
        (old.epoch(), 4, kept, noted, gap_seq)
    };
    assert!(dir.path().join("conf").exists(), "not a sled buffer");
    // sled may hold its lock for a moment after the drop.
    let buf = reopen(dir.path(), big());
    assert_eq!(buf.epoch(), epoch);
    let got: Vec<(u64, Record)> = all(&buf).into_iter().map(|s| (s.seq, s.record)).collect();
    assert_eq!(got, kept);
    assert_eq!(got.first().unwrap().0, acked + 1);
    let stats = buf.stats().unwrap();
    assert_eq!(stats.acked_up_to, acked);
    assert_eq!((stats.counts.reading, stats.counts.gap), (7, 1));
    assert_eq!(buf.delivered(&delivery(3, "10")).unwrap(), Some(noted));
    assert_eq!(buf.delivery_notes(), 1);
    for sled_file in ["conf", "db", "blobs"] {
        assert!(!dir.path().join(sled_file).exists(), "{sled_file} left");
    }
    let next = buf.append(&reading(20, 5)).unwrap();
    assert_eq!(next, kept.last().unwrap().0 + 1);
    buf.ack(gap_seq).unwrap();
    drop(buf);
    let buf = reopen(dir.path(), big());
    assert_eq!(buf.stats().unwrap().acked_up_to, gap_seq);
    assert_eq!(all(&buf).len(), 2);
}

#[test]
fn sled_files_left_by_a_crash_after_the_upgrade_committed_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let buf = Buffer::open(dir.path(), big()).unwrap();
    buf.append(&reading(1, 0)).unwrap();
    drop(buf);
    std::fs::write(dir.path().join("conf"), b"left by sled").unwrap();
    std::fs::write(dir.path().join("snap.0000000000000001"), b"left by sled").unwrap();
    let buf = reopen(dir.path(), big());
    assert_eq!(all(&buf).len(), 1);
    assert!(!dir.path().join("conf").exists());
    assert!(!dir.path().join("snap.0000000000000001").exists());
}
