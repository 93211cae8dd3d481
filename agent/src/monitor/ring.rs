//! The offline buffer's bookkeeping, without I/O: which items are held (by sequence
//! number and kind), which to evict when the buffer is full, which to send next and
//! which the sink's acknowledgement lets go. [`super::spool`] keeps one file per entry
//! and follows what this says.
//!
//! Snapshots and presence events are bounded separately: a long offline spell fills
//! the buffer with snapshots, and the few presence events (online, offline, stopped)
//! that say why there is a gap must not be the ones evicted for them.

use std::collections::VecDeque;

/// What an entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemKind {
    Presence,
    Snapshot,
}

/// One buffered item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub kind: ItemKind,
    /// Its encoded size, for keeping an upload under the sink's byte limit.
    pub len: usize,
}

/// What to upload next: the oldest entries, and the snapshots overwritten since the
/// last acknowledged upload (to be passed back to [`Ring::acknowledge`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub entries: Vec<Entry>,
    pub overwritten: u64,
}

/// The buffer: entries in increasing `seq`, at most `max_snapshots` snapshots and
/// `max_presences` presence events.
#[derive(Debug, Clone)]
pub struct Ring {
    entries: VecDeque<Entry>,
    max_snapshots: usize,
    max_presences: usize,
    snapshots: usize,
    presences: usize,
    /// Snapshots evicted and not yet reported to the sink in an acknowledged upload.
    unreported: u64,
    /// Snapshots evicted since this ring was made, less those an upload on its way
    /// delivered after all.
    overwritten_total: u64,
    /// Presence events evicted since this ring was made (not on the wire: the gap
    /// they leave is visible in the sequence numbers).
    presences_dropped: u64,
    /// The last seq of the upload on its way, if one is.
    in_flight_through: Option<u64>,
    /// Snapshots evicted while they were part of the upload on its way: lost only if
    /// that upload does not store them.
    evicted_in_flight: Vec<u64>,
}

impl Ring {
    /// A ring of at most `max_snapshots` snapshots and `max_presences` presence events
    /// (each at least 1).
    pub fn new(max_snapshots: usize, max_presences: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            max_snapshots: max_snapshots.max(1),
            max_presences: max_presences.max(1),
            snapshots: 0,
            presences: 0,
            unreported: 0,
            overwritten_total: 0,
            presences_dropped: 0,
            in_flight_through: None,
            evicted_in_flight: Vec::new(),
        }
    }

    /// Restores the count of overwritten snapshots not yet reported (from the spool's
    /// state file after a restart).
    pub fn set_unreported(&mut self, n: u64) {
        self.unreported = n;
    }

    /// Adds an entry and returns the sequence numbers evicted to make room (the
    /// caller deletes them): the oldest snapshot when a snapshot is added to a full
    /// ring, the oldest presence event likewise. Entries normally arrive in increasing
    /// `seq`; one that does not is put in its place, and one already held is ignored.
    pub fn push(&mut self, entry: Entry) -> Vec<u64> {
        let at = self.entries.partition_point(|e| e.seq < entry.seq);
        if self.entries.get(at).is_some_and(|e| e.seq == entry.seq) {
            return Vec::new();
        }
        self.entries.insert(at, entry);
        match entry.kind {
            ItemKind::Snapshot => self.snapshots += 1,
            ItemKind::Presence => self.presences += 1,
        }
        let mut evicted = Vec::new();
        while self.snapshots > self.max_snapshots {
            if let Some(seq) = self.remove_oldest(ItemKind::Snapshot) {
                self.overwritten_total += 1;
                if self.in_flight_through.is_some_and(|t| seq <= t) {
                    self.evicted_in_flight.push(seq);
                } else {
                    self.unreported += 1;
                }
                evicted.push(seq);
            }
        }
        while self.presences > self.max_presences {
            if let Some(seq) = self.remove_oldest(ItemKind::Presence) {
                self.presences_dropped += 1;
                evicted.push(seq);
            }
        }
        evicted
    }

    fn remove_oldest(&mut self, kind: ItemKind) -> Option<u64> {
        let i = self.entries.iter().position(|e| e.kind == kind)?;
        let e = self.entries.remove(i)?;
        self.count_removed(e.kind);
        Some(e.seq)
    }

    fn count_removed(&mut self, kind: ItemKind) {
        match kind {
            ItemKind::Snapshot => self.snapshots -= 1,
            ItemKind::Presence => self.presences -= 1,
        }
    }

    /// The oldest entries, at most `max_items` of them and, past the first, at most
    /// `max_bytes` in all (one entry is always offered, whatever its size, so a large
    /// snapshot cannot block the buffer). The batch is then on its way until
    /// [`acknowledge`](Self::acknowledge) or [`abandon`](Self::abandon): a snapshot of
    /// it evicted meanwhile counts as overwritten only if the upload fails to store it.
    pub fn next_batch(&mut self, max_items: usize, max_bytes: usize) -> Batch {
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        for e in self.entries.iter().take(max_items.max(1)) {
            if !entries.is_empty() && bytes.saturating_add(e.len) > max_bytes {
                break;
            }
            bytes = bytes.saturating_add(e.len);
            entries.push(*e);
        }
        if let Some(last) = entries.last() {
            self.in_flight_through = Some(last.seq.max(self.in_flight_through.unwrap_or(0)));
        }
        Batch {
            entries,
            overwritten: self.unreported,
        }
    }

    /// The upload on its way failed: its snapshots evicted meanwhile are lost.
    pub fn abandon(&mut self) {
        self.unreported += self.evicted_in_flight.len() as u64;
        self.evicted_in_flight.clear();
        self.in_flight_through = None;
    }

    /// The sink holds everything up to `stored_through_seq`, and has recorded
    /// `reported` overwritten snapshots (the [`Batch::overwritten`] of the upload it
    /// answered). Returns the sequence numbers to delete. Snapshots overwritten while
    /// the upload was on its way stay counted for the next one.
    pub fn acknowledge(&mut self, stored_through_seq: u64, reported: u64) -> Vec<u64> {
        self.unreported = self.unreported.saturating_sub(reported);
        for seq in std::mem::take(&mut self.evicted_in_flight) {
            if seq > stored_through_seq {
                self.unreported += 1;
            } else {
                // Delivered by the upload it was part of: not lost after all.
                self.overwritten_total = self.overwritten_total.saturating_sub(1);
            }
        }
        self.in_flight_through = None;
        let mut done = Vec::new();
        while let Some(e) = self.entries.front().copied() {
            if e.seq > stored_through_seq {
                break;
            }
            self.entries.pop_front();
            self.count_removed(e.kind);
            done.push(e.seq);
        }
        done
    }

    /// Forgets one entry (one the sink refused for good). Returns whether it was held.
    pub fn discard(&mut self, seq: u64) -> bool {
        let Some(i) = self.entries.iter().position(|e| e.seq == seq) else {
            return false;
        };
        if let Some(e) = self.entries.remove(i) {
            self.count_removed(e.kind);
        }
        true
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn snapshots(&self) -> usize {
        self.snapshots
    }

    pub fn presences(&self) -> usize {
        self.presences
    }

    /// The highest sequence number held.
    pub fn last_seq(&self) -> Option<u64> {
        self.entries.back().map(|e| e.seq)
    }

    /// Overwritten snapshots the sink has not been told about yet.
    pub fn unreported(&self) -> u64 {
        self.unreported
    }

    pub fn overwritten_total(&self) -> u64 {
        self.overwritten_total
    }

    pub fn presences_dropped(&self) -> u64 {
        self.presences_dropped
    }

    /// Every entry, oldest first.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(seq: u64) -> Entry {
        Entry {
            seq,
            kind: ItemKind::Snapshot,
            len: 100,
        }
    }

    fn presence(seq: u64) -> Entry {
        Entry {
            seq,
            kind: ItemKind::Presence,
            len: 10,
        }
    }

    fn seqs(ring: &Ring) -> Vec<u64> {
        ring.entries().map(|e| e.seq).collect()
    }

    #[test]
    fn pushing_520_snapshots_keeps_the_newest_500() {
        let mut ring = Ring::new(500, 5000);
        let mut evicted = Vec::new();
        for seq in 1..=520 {
            evicted.extend(ring.push(snap(seq)));
        }
        assert_eq!(evicted, (1..=20).collect::<Vec<_>>());
        assert_eq!(seqs(&ring), (21..=520).collect::<Vec<_>>());
        assert_eq!(ring.snapshots(), 500);
        assert_eq!(ring.unreported(), 20);
        assert_eq!(ring.overwritten_total(), 20);
        let batch = ring.next_batch(64, usize::MAX);
        assert_eq!(batch.entries.first().map(|e| e.seq), Some(21));
        assert_eq!(batch.entries.len(), 64);
        assert_eq!(batch.overwritten, 20);
    }

    #[test]
    fn presence_events_are_not_evicted_for_snapshots() {
        let mut ring = Ring::new(3, 2);
        ring.push(presence(1));
        for seq in 2..=5 {
            ring.push(snap(seq));
        }
        ring.push(presence(6));
        // Snapshot 2 made room for 5; presence 1 stays.
        assert_eq!(seqs(&ring), [1, 3, 4, 5, 6]);
        assert_eq!(ring.unreported(), 1);
        // A third presence event evicts the oldest presence event, not a snapshot, and
        // is not counted as an overwritten snapshot.
        assert_eq!(ring.push(presence(7)), [1]);
        assert_eq!(seqs(&ring), [3, 4, 5, 6, 7]);
        assert_eq!(ring.unreported(), 1);
        assert_eq!(ring.presences_dropped(), 1);
        assert_eq!((ring.snapshots(), ring.presences()), (3, 2));
    }

    #[test]
    fn batches_are_oldest_first_and_bounded() {
        let mut ring = Ring::new(10, 10);
        for seq in 1..=6 {
            ring.push(if seq % 2 == 0 {
                presence(seq)
            } else {
                snap(seq)
            });
        }
        let b = ring.next_batch(4, usize::MAX);
        assert_eq!(
            b.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        // 100 + 10 + 100 = 210 > 200: the third does not fit.
        let b = ring.next_batch(64, 200);
        assert_eq!(b.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
        // One entry is always offered.
        let b = ring.next_batch(64, 1);
        assert_eq!(b.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [1]);
        assert!(Ring::new(1, 1).next_batch(64, 1).entries.is_empty());
    }

    #[test]
    fn an_acknowledgement_in_the_middle_keeps_the_rest_and_later_overwrites() {
        let mut ring = Ring::new(4, 10);
        for seq in 1..=6 {
            ring.push(snap(seq));
        }
        assert_eq!(seqs(&ring), [3, 4, 5, 6]);
        let batch = ring.next_batch(3, usize::MAX);
        assert_eq!(batch.overwritten, 2);
        // While the upload of 3..=5 is on its way, three more snapshots overwrite 3, 4
        // and 5, and one more overwrites 6, which is not in the upload.
        assert_eq!(ring.push(snap(7)), [3]);
        assert_eq!(ring.push(snap(8)), [4]);
        assert_eq!(ring.push(snap(9)), [5]);
        assert_eq!(ring.push(snap(10)), [6]);
        assert_eq!(ring.unreported(), 3);
        // Counted at once (none may come back), reported once their fate is known.
        assert_eq!(ring.overwritten_total(), 6);
        // The sink stored through 4 (not 5) and recorded the 2 reported: 3 and 4 were
        // delivered after all, 5 and 6 are lost and still to be reported.
        assert_eq!(ring.acknowledge(4, batch.overwritten), Vec::<u64>::new());
        assert_eq!(ring.unreported(), 2);
        assert_eq!(ring.overwritten_total(), 4);
        assert_eq!(seqs(&ring), [7, 8, 9, 10]);
        let batch = ring.next_batch(2, usize::MAX);
        assert_eq!(batch.overwritten, 2);
        // A snapshot of a failed upload overwritten meanwhile is lost.
        assert_eq!(ring.push(snap(11)), [7]);
        ring.abandon();
        assert_eq!(ring.unreported(), 3);
        let batch = ring.next_batch(64, usize::MAX);
        assert_eq!(ring.acknowledge(9, batch.overwritten), [8, 9]);
        assert_eq!(ring.unreported(), 0);
        assert_eq!(seqs(&ring), [10, 11]);
        assert_eq!(ring.overwritten_total(), 5);
        assert_eq!(ring.acknowledge(100, 0), [10, 11]);
        assert!(ring.is_empty());
        assert_eq!(ring.snapshots(), 0);
    }

    #[test]
    fn out_of_order_and_repeated_pushes_keep_the_order() {
        let mut ring = Ring::new(10, 10);
        ring.push(snap(5));
        ring.push(presence(2));
        ring.push(snap(9));
        assert!(ring.push(snap(5)).is_empty());
        assert_eq!(seqs(&ring), [2, 5, 9]);
        assert_eq!(ring.len(), 3);
        assert!(ring.discard(5));
        assert!(!ring.discard(5));
        assert_eq!(seqs(&ring), [2, 9]);
        assert_eq!(ring.last_seq(), Some(9));
        assert_eq!(ring.snapshots(), 1);
    }
}
