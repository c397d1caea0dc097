//! Acknowledge upstream only after durability: the pieces between the MQTT source and the
//! buffer writer.
//!
//! An MQTT source hands each record to the writer in an [`crate::source::Envelope`] carrying
//! an [`AckToken`] (the packet id and QoS of the PUBLISH, not its payload). The writer appends
//! the record, keeps `(seq, token)` in [`PendingAcks`], and fires the token once the buffer's
//! durable sequence (see [`crate::buffer::Buffer::watch_durable`]) reaches `seq`.
//!
//! Invariants:
//! - A token fires only when `durable_seq >= seq`, in push order (a FIFO: a token pushed with
//!   a sequence below the last one pushed, as for a recognised redelivery whose record was
//!   stored earlier, waits for the last one, so the durable ones are always a prefix). Push
//!   order is the order the source read the messages, which is the order a broker that reuses
//!   packet ids among its in-flight messages matches PUBACKs in (the first in flight with that
//!   id); the source never hands over a message whose id an earlier, deferred one still holds
//!   on the same connection ([`crate::mqtt::admit`]).
//! - Firing never waits: [`Acknowledge::try_ack`] either queues the PubAck in rumqttc's request
//!   queue, reports it busy (queue full: the head stays, retried shortly, so order holds), or
//!   stale (the connection it arrived on is gone: the broker redelivers it on the next
//!   connection of the persistent session, and that copy carries its own token). A token busy
//!   for longer than [`BUSY_GIVE_UP`] is given up as failed, so one wedged source cannot hold
//!   back the others' acknowledgements forever. Failed tokens are counted by the writer.
//! - A message whose record became durable but whose PubAck did not reach the broker (crash,
//!   disconnect) is delivered again; the writer recognises it by its delivery note
//!   ([`crate::buffer::Buffer::delivered`]) and fires the new copy's token without storing it.
//! - The FIFO also decides when to ask for an early flush: when `threshold` tokens wait for a
//!   flush nobody asked for yet, or the oldest of them waited `max_delay`. Brokers cap the
//!   unacknowledged QoS 1 messages per client (Mosquitto `max_inflight_messages`, 20 by
//!   default); without early flushes throughput would fall to that cap per flush interval.

use std::{
    collections::{HashSet, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rumqttc::{AsyncClient, Publish};

/// How long the head of the FIFO may stay busy (rumqttc's request queue full) before it is
/// given up as failed. The source drains that queue whenever it polls its connection, so a
/// queue full for this long means the source is not polling any more.
pub const BUSY_GIVE_UP: Duration = Duration::from_secs(1);

/// What firing a token did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The acknowledgement is queued for the broker.
    Sent,
    /// The client's request queue is full: try again shortly.
    Busy,
    /// The connection the message arrived on is gone: the broker redelivers the message.
    Stale,
}

/// Something that can acknowledge one message upstream without waiting.
pub trait Acknowledge {
    fn try_ack(&self) -> AckOutcome;
    /// The writer gave up on this acknowledgement (busy for longer than [`BUSY_GIVE_UP`]):
    /// the message is stored but stays unacknowledged at the broker.
    fn given_up(&self) {}
}

/// Generation of a source's broker connection, shared with the tokens it issued: a token is
/// valid only on the connection it arrived on.
///
/// It also keeps the [`Ledger`] of the source's acknowledgements (a separate `Arc`:
/// [`Connection::tokens_alive`] counts the holders of `generation`).
#[derive(Debug, Clone, Default)]
pub struct Connection {
    generation: Arc<AtomicU64>,
    ledger: Arc<Mutex<Ledger>>,
}

/// Most message keys [`Ledger::owed`] holds (8 bytes each); beyond it a lost acknowledgement
/// is left to the delivery notes alone (see `docs/operations.md`).
pub const MAX_OWED_KEYS: usize = 1 << 20;

/// How many acknowledgements written on the current connection the ledger remembers: if the
/// connection then fails, the broker may not have read them (they were in a socket buffer),
/// so they count as owed too (a PubAck is 4 bytes: 32 KiB of socket buffer). Kept small:
/// owed keys of messages the broker did settle stay until [`MAX_OWED_KEYS`] and widen the
/// identical-message window (`docs/operations.md`).
pub const RECENT_WRITTEN_KEYS: usize = 1 << 13;

/// What became of the acknowledgements of one MQTT source's stored messages, by message key
/// (packet id and content, [`crate::mqtt`]'s `deferred_key`).
///
/// A message whose record is durable but whose PubAck never reached the broker stays in flight
/// there and comes back (DUP set) on a later connection, possibly much later: behind the
/// deferred backlog, which the broker resends first, and after more stored deliveries than the
/// buffer keeps notes for. The ledger remembers such messages as *owed* (in memory, at most
/// [`MAX_OWED_KEYS`]), so the source recognises the copy without the note.
#[derive(Debug, Default)]
struct Ledger {
    /// PubAcks queued in rumqttc's request queue and not yet written, oldest first, with the
    /// generation they were queued on. rumqttc writes its requests in queue order.
    queued: VecDeque<(u64, u64)>,
    /// The last PubAcks written on the current connection (at most [`RECENT_WRITTEN_KEYS`]).
    written: VecDeque<u64>,
    /// Messages stored (record durable) whose acknowledgement did not reach the broker.
    owed: HashSet<u64>,
}

impl Ledger {
    fn owe(&mut self, key: u64) {
        if self.owed.len() < MAX_OWED_KEYS {
            self.owed.insert(key);
        }
    }
}

const CLOSED: u64 = u64::MAX;

impl Connection {
    fn current(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // A panic while holding the lock left plain collections behind: still usable.
        self.ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// rumqttc wrote the oldest queued PubAck (its `Outgoing::PubAck` event). PubAcks queued
    /// on an earlier connection ahead of it were dropped with that connection: owed.
    pub(crate) fn ack_written(&self) {
        let current = self.current();
        let mut l = self.ledger();
        while let Some((generation, key)) = l.queued.pop_front() {
            if generation != current {
                l.owe(key);
                continue;
            }
            if l.written.len() >= RECENT_WRITTEN_KEYS {
                l.written.pop_front();
            }
            l.written.push_back(key);
            break;
        }
    }

    /// PubAcks queued and not written yet.
    pub(crate) fn acks_unwritten(&self) -> usize {
        self.ledger().queued.len()
    }

    /// The connection ended. Whatever was queued but not written is owed; with `clean` (the
    /// DISCONNECT was written after them, so the broker read every PubAck before it) the
    /// written ones are settled, otherwise the last ones written may not have reached the
    /// broker and are owed too. Call before [`Connection::lost`]'s effects matter: tokens
    /// racing with it are caught by their generation.
    pub(crate) fn ended(&self, clean: bool) {
        let mut l = self.ledger();
        let queued: Vec<u64> = l.queued.drain(..).map(|(_, k)| k).collect();
        let written: Vec<u64> = l.written.drain(..).collect();
        for k in queued {
            l.owe(k);
        }
        if !clean {
            for k in written {
                l.owe(k);
            }
        }
    }

    /// Whether the message `key` was stored earlier with its acknowledgement lost (and forgets
    /// it: this copy is acknowledged in its place).
    pub(crate) fn take_owed(&self, key: u64) -> bool {
        let mut l = self.ledger();
        !l.owed.is_empty() && l.owed.remove(&key)
    }

    /// Messages owed an acknowledgement (see [`Ledger`]).
    pub fn owed(&self) -> usize {
        self.ledger().owed.len()
    }

    /// The connection was lost: tokens issued so far become stale.
    pub(crate) fn lost(&self) {
        // Never wraps into CLOSED in practice (2^64 reconnects).
        let _ = self
            .generation
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |g| {
                (g != CLOSED).then(|| g + 1)
            });
    }

    /// The source stopped: every token becomes stale.
    pub(crate) fn close(&self) {
        self.generation.store(CLOSED, Ordering::Release);
    }

    /// Tokens of this connection still alive (in a channel or in a writer's FIFO).
    pub(crate) fn tokens_alive(&self) -> usize {
        Arc::strong_count(&self.generation).saturating_sub(1)
    }
}

/// Acknowledges one MQTT PUBLISH (QoS 1) once fired.
#[derive(Debug)]
pub struct AckToken {
    client: AsyncClient,
    /// Packet id and QoS are what the PubAck needs; topic and payload are dropped.
    publish: Publish,
    connection: Connection,
    generation: u64,
    /// The message's key in the [`Ledger`].
    key: u64,
}

impl AckToken {
    pub(crate) fn new(
        client: &AsyncClient,
        publish: &Publish,
        connection: &Connection,
        key: u64,
    ) -> Self {
        let mut minimal = Publish::new("", publish.qos, Vec::new());
        minimal.pkid = publish.pkid;
        Self {
            client: client.clone(),
            publish: minimal,
            connection: connection.clone(),
            generation: connection.current(),
            key,
        }
    }
}

impl Acknowledge for AckToken {
    fn try_ack(&self) -> AckOutcome {
        // Fired only once the record is durable (or, for a recognised redelivery, the earlier
        // one): whatever happens to the PubAck from here, the message is stored. The lock is
        // held across the queueing so that the source sees the entry before rumqttc's
        // `Outgoing::PubAck` for it.
        let mut ledger = self.connection.ledger();
        if self.connection.current() != self.generation {
            ledger.owe(self.key);
            return AckOutcome::Stale;
        }
        match self.client.try_ack(&self.publish) {
            Ok(()) => {
                ledger.queued.push_back((self.generation, self.key));
                AckOutcome::Sent
            }
            // rumqttc does not say whether the queue is full or the event loop gone; a gone
            // event loop means the source closed or lost the connection (checked here), or it
            // is busy for longer than BUSY_GIVE_UP.
            Err(_) if self.connection.current() != self.generation => {
                ledger.owe(self.key);
                AckOutcome::Stale
            }
            Err(_) => AckOutcome::Busy,
        }
    }

    fn given_up(&self) {
        self.connection.ledger().owe(self.key);
    }
}

/// What one [`PendingAcks::release`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    pub sent: u64,
    /// Stale tokens and tokens busy for longer than [`BUSY_GIVE_UP`].
    pub failed: u64,
    /// The head is busy: call again shortly.
    pub busy: bool,
}

#[derive(Debug)]
struct Pending<T> {
    seq: u64,
    at: Instant,
    token: T,
}

/// Tokens waiting for their records to become durable, in sequence order.
#[derive(Debug)]
pub struct PendingAcks<T> {
    queue: VecDeque<Pending<T>>,
    /// A flush was requested (or completed) covering every sequence up to this one.
    requested_upto: u64,
    /// Since when the head has been busy.
    busy_since: Option<Instant>,
}

impl<T> Default for PendingAcks<T> {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            requested_upto: 0,
            busy_since: None,
        }
    }
}

impl<T: Acknowledge> PendingAcks<T> {
    /// Keeps `token` until sequence `seq` (and every one pushed before) is durable.
    pub fn push(&mut self, seq: u64, token: T, now: Instant) {
        // An older sequence (a redelivery stored earlier) waits behind the newest one, which
        // keeps the queue sorted; it is durable no later than that.
        let seq = self.queue.back().map_or(seq, |p| p.seq.max(seq));
        self.queue.push_back(Pending {
            seq,
            at: now,
            token,
        });
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Index of the first token no flush was requested for.
    fn first_unrequested(&self) -> usize {
        self.queue.partition_point(|p| p.seq <= self.requested_upto)
    }

    /// When the oldest token without a requested flush will have waited `max_delay`.
    pub fn flush_deadline(&self, max_delay: Duration) -> Option<Instant> {
        self.queue
            .get(self.first_unrequested())
            .map(|p| p.at + max_delay)
    }

    /// True when a flush should be requested now (`threshold` tokens without a requested
    /// flush, or the oldest of them `max_delay` old); then counts them all as requested.
    pub fn take_flush_request(
        &mut self,
        threshold: usize,
        max_delay: Duration,
        now: Instant,
    ) -> bool {
        let first = self.first_unrequested();
        let (Some(oldest), Some(newest)) = (self.queue.get(first), self.queue.back()) else {
            return false;
        };
        if self.queue.len() - first >= threshold || now >= oldest.at + max_delay {
            self.requested_upto = newest.seq;
            true
        } else {
            false
        }
    }

    /// Fires, in order, every token whose sequence is `<= durable`, stopping at a busy one.
    pub fn release(&mut self, durable: u64, now: Instant) -> Released {
        // A completed flush covers these whether or not someone asked for it.
        self.requested_upto = self.requested_upto.max(durable);
        let mut out = Released::default();
        while let Some(head) = self.queue.front() {
            if head.seq > durable {
                break;
            }
            match head.token.try_ack() {
                AckOutcome::Sent => out.sent += 1,
                AckOutcome::Stale => out.failed += 1,
                AckOutcome::Busy => {
                    let since = *self.busy_since.get_or_insert(now);
                    if now.duration_since(since) < BUSY_GIVE_UP {
                        out.busy = true;
                        return out;
                    }
                    head.token.given_up();
                    out.failed += 1;
                }
            }
            self.busy_since = None;
            self.queue.pop_front();
        }
        out
    }

    /// Drops every token without firing it (their messages will be redelivered); returns how
    /// many.
    pub fn abandon(&mut self) -> u64 {
        let n = self.queue.len() as u64;
        self.queue.clear();
        self.busy_since = None;
        n
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, rc::Rc};

    use super::*;

    /// Records which tokens fired; answers from a script.
    #[derive(Debug, Clone)]
    struct Fake {
        id: u64,
        log: Rc<RefCell<Vec<u64>>>,
        answers: Rc<RefCell<VecDeque<AckOutcome>>>,
    }

    impl Acknowledge for Fake {
        fn try_ack(&self) -> AckOutcome {
            let a = self
                .answers
                .borrow_mut()
                .pop_front()
                .unwrap_or(AckOutcome::Sent);
            if a == AckOutcome::Sent {
                self.log.borrow_mut().push(self.id);
            }
            a
        }
    }

    struct Setup {
        acks: PendingAcks<Fake>,
        log: Rc<RefCell<Vec<u64>>>,
        answers: Rc<RefCell<VecDeque<AckOutcome>>>,
        t0: Instant,
    }

    impl Setup {
        fn new() -> Self {
            Self {
                acks: PendingAcks::default(),
                log: Rc::default(),
                answers: Rc::default(),
                t0: Instant::now(),
            }
        }
        fn push(&mut self, seq: u64, at_ms: u64) {
            let fake = Fake {
                id: seq,
                log: self.log.clone(),
                answers: self.answers.clone(),
            };
            self.acks.push(seq, fake, self.at(at_ms));
        }
        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }
        fn fired(&self) -> Vec<u64> {
            self.log.borrow().clone()
        }
    }

    #[test]
    fn a_token_fires_only_once_its_sequence_is_durable_and_in_order() {
        let mut s = Setup::new();
        for seq in [3, 5, 8] {
            s.push(seq, 0);
        }
        assert_eq!(s.acks.release(2, s.at(1)), Released::default());
        assert!(s.fired().is_empty());
        let r = s.acks.release(5, s.at(1));
        assert_eq!((r.sent, r.failed, r.busy), (2, 0, false));
        assert_eq!(s.fired(), vec![3, 5]);
        assert_eq!(s.acks.len(), 1);
        // Durable 7 does not cover 8.
        assert_eq!(s.acks.release(7, s.at(1)).sent, 0);
        assert_eq!(s.acks.release(100, s.at(1)).sent, 1);
        assert_eq!(s.fired(), vec![3, 5, 8]);
        assert!(s.acks.is_empty());
    }

    #[test]
    fn stale_tokens_are_counted_as_failed_and_do_not_block_the_rest() {
        let mut s = Setup::new();
        for seq in 1..=3 {
            s.push(seq, 0);
        }
        s.answers
            .borrow_mut()
            .extend([AckOutcome::Sent, AckOutcome::Stale]);
        let r = s.acks.release(3, s.at(0));
        assert_eq!((r.sent, r.failed, r.busy), (2, 1, false));
        assert_eq!(s.fired(), vec![1, 3]);
    }

    #[test]
    fn a_busy_head_is_retried_in_order_then_given_up_after_the_limit() {
        let mut s = Setup::new();
        for seq in 1..=3 {
            s.push(seq, 0);
        }
        s.answers
            .borrow_mut()
            .extend([AckOutcome::Sent, AckOutcome::Busy]);
        let r = s.acks.release(3, s.at(0));
        assert_eq!((r.sent, r.failed, r.busy), (1, 0, true));
        // Retried: the head goes first, then the next one.
        let r = s.acks.release(3, s.at(5));
        assert_eq!((r.sent, r.failed, r.busy), (2, 0, false));
        assert_eq!(s.fired(), vec![1, 2, 3]);

        for seq in 4..=5 {
            s.push(seq, 10);
        }
        s.answers
            .borrow_mut()
            .extend([AckOutcome::Busy, AckOutcome::Busy]);
        assert!(s.acks.release(5, s.at(10)).busy);
        let later = 10 + BUSY_GIVE_UP.as_millis() as u64;
        let r = s.acks.release(5, s.at(later));
        assert_eq!((r.sent, r.failed, r.busy), (1, 1, false));
        assert_eq!(s.fired(), vec![1, 2, 3, 5]);
    }

    #[test]
    fn an_early_flush_is_asked_at_the_threshold_or_after_the_delay_once() {
        let delay = Duration::from_millis(5);
        let mut s = Setup::new();
        assert!(!s.acks.take_flush_request(3, delay, s.at(0)));
        assert_eq!(s.acks.flush_deadline(delay), None);
        s.push(1, 0);
        s.push(2, 1);
        assert!(!s.acks.take_flush_request(3, delay, s.at(1)));
        assert_eq!(s.acks.flush_deadline(delay), Some(s.at(5)));
        s.push(3, 2);
        assert!(s.acks.take_flush_request(3, delay, s.at(2)), "threshold");
        // Already requested: neither the count nor the age asks again.
        assert!(!s.acks.take_flush_request(1, delay, s.at(100)));
        assert_eq!(s.acks.flush_deadline(delay), None);
        s.push(4, 50);
        assert!(!s.acks.take_flush_request(3, delay, s.at(54)));
        assert!(s.acks.take_flush_request(3, delay, s.at(55)), "age");
        // A flush that completes on its own (periodic tick) covers its tokens too.
        s.push(5, 60);
        s.acks.release(5, s.at(61));
        assert!(!s.acks.take_flush_request(1, delay, s.at(100)));
        assert!(s.acks.is_empty());
    }

    #[test]
    fn abandoning_drops_every_token_unfired() {
        let mut s = Setup::new();
        s.push(1, 0);
        s.push(2, 0);
        assert_eq!(s.acks.abandon(), 2);
        assert!(s.fired().is_empty());
        assert!(s.acks.is_empty());
    }

    #[test]
    fn connection_generations_make_older_tokens_stale() {
        let c = Connection::default();
        let g0 = c.current();
        let clone = c.clone();
        assert_eq!(c.tokens_alive(), 1);
        drop(clone);
        assert_eq!(c.tokens_alive(), 0);
        c.lost();
        assert_ne!(c.current(), g0);
        c.close();
        c.lost();
        assert_eq!(c.current(), CLOSED, "a closed connection stays closed");
    }

    fn token(client: &AsyncClient, c: &Connection, pkid: u16, key: u64) -> AckToken {
        let mut p = Publish::new("t", rumqttc::QoS::AtLeastOnce, b"1".to_vec());
        p.pkid = pkid;
        AckToken::new(client, &p, c, key)
    }

    #[test]
    fn acknowledgements_that_did_not_reach_the_broker_are_owed() {
        let (client, _eventloop) =
            AsyncClient::new(rumqttc::MqttOptions::new("t", "127.0.0.1", 1), 16);
        let c = Connection::default();
        // Queued, then written: nothing owed after a clean leave.
        assert_eq!(token(&client, &c, 1, 11).try_ack(), AckOutcome::Sent);
        assert_eq!(c.acks_unwritten(), 1);
        c.ack_written();
        assert_eq!(c.acks_unwritten(), 0);
        c.ended(true);
        assert!(!c.take_owed(11));
        // Queued but not written when the connection ended: owed.
        assert_eq!(token(&client, &c, 2, 12).try_ack(), AckOutcome::Sent);
        c.ended(true);
        c.lost();
        // Written, then the connection failed: maybe unread by the broker, owed too.
        assert_eq!(token(&client, &c, 3, 13).try_ack(), AckOutcome::Sent);
        c.ack_written();
        c.ended(false);
        // Fired after the connection was lost: stale, owed.
        let stale = token(&client, &c, 4, 14);
        c.lost();
        assert_eq!(stale.try_ack(), AckOutcome::Stale);
        // Given up by the writer: owed.
        token(&client, &c, 5, 15).given_up();
        assert_eq!(c.owed(), 4);
        for key in [12, 13, 14, 15] {
            assert!(c.take_owed(key), "{key}");
            assert!(!c.take_owed(key), "{key} is forgotten once its copy came");
        }
    }
}
