//! Placement without I/O: a view of the relays (capacity, load, draining) and the
//! choice of where the next session goes, by power-of-two choices on free capacity.
//!
//! Why two random choices and not the least-loaded relay: several coordinator replicas
//! place at once from views that lag the relays' own reports by up to a second; all of
//! them would pick the same least-loaded relay and pile onto it. Two random candidates,
//! keeping the freer one, spread that herd while still keeping the maximum load within
//! a few sessions of the mean (the spread test measures it).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::RelayInfo;

/// How a relay's load is estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accounting {
    /// Only this process places sessions: its own count (picks minus releases) is exact.
    Local,
    /// Relays report their live sessions (about every second); placements this process
    /// made within the window are added, since a placed session reaches the relay's
    /// count only once a participant attaches. Older ones are assumed to be in the
    /// report (or never to arrive), so the estimate cannot drift.
    ReportedPlusRecent(Duration),
}

/// One relay as placement sees it.
#[derive(Debug, Clone)]
pub struct ViewEntry {
    pub info: RelayInfo,
    /// Most sessions the relay takes.
    pub capacity: u64,
    /// Live sessions the relay last reported.
    pub reported: u64,
    pub draining: bool,
    /// Picks minus releases by this process.
    local: u64,
    /// When this process's recent picks were made, oldest first.
    recent: VecDeque<Instant>,
}

impl ViewEntry {
    pub fn new(info: RelayInfo, capacity: u64) -> Self {
        Self {
            info,
            capacity,
            reported: 0,
            draining: false,
            local: 0,
            recent: VecDeque::new(),
        }
    }
}

/// The relays a coordinator may place on, with their estimated loads.
#[derive(Debug, Clone)]
pub struct RelayView {
    accounting: Accounting,
    entries: Vec<ViewEntry>,
    index: HashMap<String, usize>,
    /// Entry indices per region; rebuilt lazily after membership changes.
    regions: HashMap<String, Vec<usize>>,
    regions_dirty: bool,
    rng: u64,
}

/// Which relays a pick may consider.
#[derive(Clone, Copy)]
enum Pool<'a> {
    All(usize),
    Some(&'a [usize]),
}

impl Pool<'_> {
    fn len(&self) -> usize {
        match self {
            Pool::All(n) => *n,
            Pool::Some(v) => v.len(),
        }
    }

    fn at(&self, k: usize) -> usize {
        match self {
            Pool::All(_) => k,
            Pool::Some(v) => v[k],
        }
    }
}

/// Random candidates tried before falling back to a full scan; with a sane cluster
/// (most relays placeable) a pick costs O(1).
const SAMPLE_TRIES: usize = 16;

impl RelayView {
    pub fn new(accounting: Accounting, seed: u64) -> Self {
        Self {
            accounting,
            entries: Vec::new(),
            index: HashMap::new(),
            regions: HashMap::new(),
            regions_dirty: false,
            // xorshift needs a non-zero state.
            rng: seed | 1,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every relay, sorted by id.
    pub fn entries(&self) -> Vec<&ViewEntry> {
        let mut all: Vec<&ViewEntry> = self.entries.iter().collect();
        all.sort_by(|a, b| a.info.relay_id.cmp(&b.info.relay_id));
        all
    }

    pub fn get(&self, relay_id: &str) -> Option<&ViewEntry> {
        self.index.get(relay_id).map(|&i| &self.entries[i])
    }

    /// Adds a relay or updates what it reported; this process's own accounting of it
    /// is kept across updates.
    pub fn upsert(&mut self, info: RelayInfo, capacity: u64, reported: u64, draining: bool) {
        match self.index.get(&info.relay_id) {
            Some(&i) => {
                let e = &mut self.entries[i];
                self.regions_dirty |= e.info.region != info.region;
                e.info = info;
                e.capacity = capacity;
                e.reported = reported;
                e.draining = draining;
            }
            None => {
                let mut e = ViewEntry::new(info, capacity);
                e.reported = reported;
                e.draining = draining;
                self.index
                    .insert(e.info.relay_id.clone(), self.entries.len());
                self.entries.push(e);
                self.regions_dirty = true;
            }
        }
    }

    /// Forgets a relay (its lease expired or it left). Returns whether it was known.
    pub fn remove(&mut self, relay_id: &str) -> bool {
        let Some(i) = self.index.remove(relay_id) else {
            return false;
        };
        self.entries.swap_remove(i);
        self.regions_dirty = true;
        if let Some(moved) = self.entries.get(i) {
            self.index.insert(moved.info.relay_id.clone(), i);
        }
        true
    }

    /// Replaces every relay at once (a fresh read of etcd), keeping this process's
    /// accounting for relays that stay.
    pub fn replace_all(&mut self, relays: Vec<(RelayInfo, u64, u64, bool)>) {
        let keep: std::collections::HashSet<String> =
            relays.iter().map(|r| r.0.relay_id.clone()).collect();
        let gone: Vec<String> = self
            .index
            .keys()
            .filter(|id| !keep.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            self.remove(&id);
        }
        for (info, capacity, reported, draining) in relays {
            self.upsert(info, capacity, reported, draining);
        }
    }

    /// Estimated sessions on the relay at `now`.
    pub fn load(&mut self, i: usize, now: Instant) -> u64 {
        let accounting = self.accounting;
        let e = &mut self.entries[i];
        match accounting {
            Accounting::Local => e.local,
            Accounting::ReportedPlusRecent(window) => {
                while e
                    .recent
                    .front()
                    .is_some_and(|t| now.saturating_duration_since(*t) > window)
                {
                    e.recent.pop_front();
                }
                e.reported.saturating_add(e.recent.len() as u64)
            }
        }
    }

    /// Free places on relay `i`, or `None` if it must not be chosen.
    fn free(&mut self, i: usize, avoid: Option<&str>, now: Instant) -> Option<u64> {
        let e = &self.entries[i];
        if e.draining || avoid == Some(e.info.relay_id.as_str()) {
            return None;
        }
        let capacity = e.capacity;
        let load = self.load(i, now);
        capacity.checked_sub(load).filter(|f| *f > 0)
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: placement needs spread, not secrecy.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A random placeable relay among `pool`, or `None` after [`SAMPLE_TRIES`] misses.
    fn sample(
        &mut self,
        pool: Pool<'_>,
        avoid: Option<&str>,
        now: Instant,
        not: Option<usize>,
    ) -> Option<(usize, u64)> {
        if pool.len() == 0 {
            return None;
        }
        for _ in 0..SAMPLE_TRIES {
            let i = pool.at((self.next_random() % pool.len() as u64) as usize);
            if Some(i) == not {
                continue;
            }
            if let Some(free) = self.free(i, avoid, now) {
                return Some((i, free));
            }
        }
        None
    }

    /// Chooses a relay for a session, counts the session against it, and returns it:
    /// of two random placeable relays the one with more free places, in `region` when
    /// any relay there is placeable. Never a draining, full or `avoid`ed relay.
    pub fn pick(&mut self, avoid: Option<&str>, region: &str, now: Instant) -> Option<RelayInfo> {
        let mut chosen = None;
        if !region.is_empty() {
            if self.regions_dirty {
                self.regions.clear();
                for (i, e) in self.entries.iter().enumerate() {
                    self.regions
                        .entry(e.info.region.clone())
                        .or_default()
                        .push(i);
                }
                self.regions_dirty = false;
            }
            // Taken out for the pick so `self` stays mutable; put back right after.
            if let Some(pool) = self.regions.remove(region) {
                chosen = self.choose_in(Pool::Some(&pool), avoid, now);
                self.regions.insert(region.to_owned(), pool);
            }
        }
        if chosen.is_none() {
            chosen = self.choose_in(Pool::All(self.entries.len()), avoid, now);
        }
        let i = chosen?;
        let e = &mut self.entries[i];
        e.local = e.local.saturating_add(1);
        if let Accounting::ReportedPlusRecent(_) = self.accounting {
            e.recent.push_back(now);
        }
        Some(e.info.clone())
    }

    fn choose_in(&mut self, pool: Pool<'_>, avoid: Option<&str>, now: Instant) -> Option<usize> {
        let first = match self.sample(pool, avoid, now, None) {
            Some(f) => f,
            // Few placeable relays: look at all of them.
            None => return self.scan(pool, avoid, now),
        };
        let second = self.sample(pool, avoid, now, Some(first.0));
        let second = match second {
            Some(s) => Some(s),
            // Maybe `first` is the only placeable one; a scan settles it exactly.
            None => self
                .scan(pool, avoid, now)
                .filter(|&i| i != first.0)
                .and_then(|i| self.free(i, avoid, now).map(|f| (i, f))),
        };
        Some(match second {
            Some(s) if s.1 > first.1 => s.0,
            _ => first.0,
        })
    }

    /// The placeable relay with the most free places in `pool` (exact, O(n)).
    fn scan(&mut self, pool: Pool<'_>, avoid: Option<&str>, now: Instant) -> Option<usize> {
        let mut best: Option<(usize, u64)> = None;
        for k in 0..pool.len() {
            let i = pool.at(k);
            if let Some(free) = self.free(i, avoid, now)
                && best.is_none_or(|(_, b)| free > b)
            {
                best = Some((i, free));
            }
        }
        best.map(|(i, _)| i)
    }

    /// A session placed on `relay_id` ended or was moved.
    pub fn release(&mut self, relay_id: &str) {
        if let Some(&i) = self.index.get(relay_id) {
            let e = &mut self.entries[i];
            e.local = e.local.saturating_sub(1);
            e.recent.pop_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(i: usize, region: &str) -> RelayInfo {
        RelayInfo {
            relay_id: format!("r{i}"),
            quic_addr: format!("127.0.0.1:{}", 1000 + i),
            admin_url: format!("http://127.0.0.1:{}", 2000 + i),
            server_name: "localhost".into(),
            cert_sha256: [0; 32],
            region: region.into(),
        }
    }

    #[test]
    fn never_draining_full_or_avoided() {
        let now = Instant::now();
        let mut v = RelayView::new(Accounting::Local, 7);
        v.upsert(relay(1, ""), 10, 0, true);
        v.upsert(relay(2, ""), 1, 0, false);
        v.upsert(relay(3, ""), 10, 0, false);
        for _ in 0..50 {
            let got = v.pick(Some("r3"), "", now);
            // r2 has one place; after that nothing is left.
            if let Some(r) = got {
                assert_eq!(r.relay_id, "r2");
            }
        }
        assert_eq!(v.get("r2").map(|e| e.local), Some(1));
        assert!(v.pick(Some("r3"), "", now).is_none());
        assert_eq!(v.pick(None, "", now).map(|r| r.relay_id), Some("r3".into()));
        assert!(v.remove("r3"));
        assert!(!v.remove("r3"));
        assert!(v.pick(None, "", now).is_none());
    }

    #[test]
    fn region_is_preferred_while_it_has_room() {
        let now = Instant::now();
        let mut v = RelayView::new(Accounting::Local, 9);
        v.upsert(relay(1, "tokyo"), 2, 0, false);
        v.upsert(relay(2, "osaka"), 100, 0, false);
        let first: Vec<String> = (0..2)
            .filter_map(|_| v.pick(None, "tokyo", now).map(|r| r.relay_id))
            .collect();
        assert_eq!(first, vec!["r1", "r1"]);
        assert_eq!(
            v.pick(None, "tokyo", now).map(|r| r.relay_id),
            Some("r2".into()),
            "a full region spills over"
        );
    }

    #[test]
    fn recent_picks_count_until_the_window_passes() {
        let t0 = Instant::now();
        let window = Duration::from_secs(5);
        let mut v = RelayView::new(Accounting::ReportedPlusRecent(window), 3);
        v.upsert(relay(1, ""), 10, 4, false);
        assert!(v.pick(None, "", t0).is_some());
        assert_eq!(v.load(0, t0), 5);
        // The relay's next report includes the session; the window lets it go.
        v.upsert(relay(1, ""), 10, 5, false);
        assert_eq!(v.load(0, t0 + window + Duration::from_millis(1)), 5);
        v.release("r1");
        assert_eq!(v.load(0, t0), 5);
    }

    /// Max/mean load over 1,000 relays and 100 sessions each on average. Prints the
    /// ratio (see the README); the bound here only catches a broken policy.
    #[test]
    fn spread_over_a_thousand_relays_is_even() {
        let now = Instant::now();
        let n = 1000;
        let per = 100;
        let mut v = RelayView::new(
            Accounting::ReportedPlusRecent(Duration::from_secs(3600)),
            11,
        );
        for i in 0..n {
            v.upsert(relay(i, ""), 10_000, 0, false);
        }
        for _ in 0..n * per {
            assert!(v.pick(None, "", now).is_some());
        }
        let loads: Vec<u64> = (0..n).map(|i| v.load(i, now)).collect();
        let max = *loads.iter().max().unwrap_or(&0) as f64;
        let mean = loads.iter().sum::<u64>() as f64 / n as f64;
        let ratio = max / mean;
        println!(
            "placement spread: {n} relays, {} sessions, max/mean = {ratio:.3}",
            n * per
        );
        assert!(ratio < 1.2, "max/mean {ratio}");
    }
}
