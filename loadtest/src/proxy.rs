//! A user-space UDP impairment proxy: delay, jitter and loss for WAN profiles (this
//! kernel has no netem), and a blackhole that makes a relay vanish without a goodbye, as
//! a crashed machine or a cut link would. A bandwidth bottleneck with a drop-tail queue
//! ([`RateLimit`]) on the way to the upstream, for congestion a sender must adapt to.
//!
//! One front socket faces the clients; each client address gets its own upstream socket,
//! so the relay sees one peer per client, as it would without the proxy.

use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Clients one proxy serves at most; a load test's sessions stay well below.
const MAX_CLIENTS: usize = 16_384;
const MAX_DATAGRAM: usize = 65_536;
/// Packets waiting in a delay line at most; past that they are dropped, like a full
/// router queue.
const DELAY_QUEUE: usize = 65_536;
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// What the proxy does to each datagram, in each direction.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Impairment {
    /// One-way delay added to every datagram.
    pub delay: Duration,
    /// Each datagram's delay is drawn uniformly from `delay ± jitter`.
    pub jitter: Duration,
    /// Probability in [0, 1] of dropping a datagram.
    pub loss: f64,
}

impl Impairment {
    /// Named WAN profiles for load tests (one-way figures).
    pub fn profile(name: &str) -> Option<Self> {
        let ms = Duration::from_millis;
        Some(match name {
            "lan" => Self::default(),
            "broadband" => Self {
                delay: ms(10),
                jitter: ms(2),
                loss: 0.001,
            },
            "mobile" => Self {
                delay: ms(35),
                jitter: ms(10),
                loss: 0.01,
            },
            "intercontinental" => Self {
                delay: ms(90),
                jitter: ms(5),
                loss: 0.005,
            },
            _ => return None,
        })
    }

    pub const PROFILES: [&'static str; 4] = ["lan", "broadband", "mobile", "intercontinental"];
}

/// A bottleneck: datagrams leave at `bits_per_second`, waiting in a drop-tail queue that
/// holds at most `queue` of sending time (a router's buffer; overflow is loss).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub bits_per_second: u64,
    pub queue: Duration,
}

#[derive(Default)]
struct State {
    /// The bottleneck towards the upstream, if any.
    upstream_limit: Mutex<Option<RateLimit>>,
    blackhole: AtomicBool,
    impairment: Mutex<Impairment>,
    forwarded: AtomicU64,
    dropped: AtomicU64,
}

/// A running proxy; stops when dropped.
pub struct UdpProxy {
    local: SocketAddr,
    state: Arc<State>,
    _task: JoinSet<()>,
}

impl UdpProxy {
    /// Listens on an OS-chosen loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let front = Arc::new(bind("127.0.0.1:0".parse().expect("literal address"))?);
        let local = front.local_addr()?;
        let state = Arc::new(State::default());
        let mut task = JoinSet::new();
        task.spawn(run(front, upstream, state.clone()));
        Ok(Self {
            local,
            state,
            _task: task,
        })
    }

    /// The address clients dial instead of the upstream's.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn set_impairment(&self, impairment: Impairment) {
        if let Ok(mut i) = self.state.impairment.lock() {
            *i = impairment;
        }
    }

    /// Puts a bottleneck on the clients → upstream direction (shared by every client,
    /// as an uplink would be), or lifts it with `None`. The other direction is free.
    pub fn set_upstream_limit(&self, limit: Option<RateLimit>) {
        if let Ok(mut l) = self.state.upstream_limit.lock() {
            *l = limit;
        }
    }

    /// While on, every datagram in both directions is silently dropped.
    pub fn blackhole(&self, on: bool) {
        self.state.blackhole.store(on, Ordering::Relaxed);
    }

    /// Datagrams forwarded and dropped so far, both directions.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.state.forwarded.load(Ordering::Relaxed),
            self.state.dropped.load(Ordering::Relaxed),
        )
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Best effort: capped by net.core.{r,w}mem_max.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

#[derive(Clone)]
enum Dest {
    Upstream(Arc<UdpSocket>),
    Client(Arc<UdpSocket>, SocketAddr),
}

impl Dest {
    async fn send(&self, packet: &[u8]) {
        // UDP: a failed send is a lost datagram, which QUIC recovers from.
        let _ = match self {
            Dest::Upstream(s) => s.send(packet).await,
            Dest::Client(s, to) => s.send_to(packet, to).await,
        };
    }
}

struct Delayed {
    due: Instant,
    order: u64,
    packet: Vec<u8>,
    dest: Dest,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.order) == (other.due, other.order)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    // Reversed: BinaryHeap is a max-heap and the earliest due must come out first.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.due, other.order).cmp(&(self.due, self.order))
    }
}

/// Applies loss and delay to datagrams in both directions.
struct Shaper {
    state: Arc<State>,
    rng: u64,
    line: mpsc::Sender<Delayed>,
    order: u64,
    /// Whether this shaper carries datagrams towards the upstream (where a
    /// [`RateLimit`] applies).
    upstream: bool,
    /// When the bottleneck has sent everything queued so far.
    busy_until: Instant,
}

impl Shaper {
    async fn forward(&mut self, packet: Vec<u8>, dest: Dest) {
        let impairment = self.state.impairment.lock().map(|i| *i).unwrap_or_default();
        if self.state.blackhole.load(Ordering::Relaxed) || self.chance() < impairment.loss {
            self.state.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let queued = match self.bottleneck(packet.len()) {
            Some(wait) => wait,
            None => {
                self.state.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        self.state.forwarded.fetch_add(1, Ordering::Relaxed);
        if impairment.delay.is_zero() && impairment.jitter.is_zero() && queued.is_zero() {
            dest.send(&packet).await;
            return;
        }
        let jitter = impairment.jitter.as_secs_f64();
        let offset = (self.chance() * 2.0 - 1.0) * jitter;
        let delay = (impairment.delay.as_secs_f64() + offset).max(0.0) + queued.as_secs_f64();
        self.order += 1;
        let delayed = Delayed {
            due: Instant::now() + Duration::from_secs_f64(delay),
            order: self.order,
            packet,
            dest,
        };
        if self.line.try_send(delayed).is_err() {
            self.state.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Passes a datagram of `len` bytes through the bottleneck: how long it waits there
    /// (queue plus its own sending time), or `None` when the queue is full.
    fn bottleneck(&mut self, len: usize) -> Option<Duration> {
        let limit = if self.upstream {
            self.state
                .upstream_limit
                .lock()
                .map(|l| *l)
                .unwrap_or_default()
        } else {
            None
        };
        let Some(limit) = limit.filter(|l| l.bits_per_second > 0) else {
            return Some(Duration::ZERO);
        };
        let now = Instant::now();
        let start = self.busy_until.max(now);
        if start - now > limit.queue {
            return None;
        }
        let sending = Duration::from_secs_f64(len as f64 * 8.0 / limit.bits_per_second as f64);
        self.busy_until = start + sending;
        Some(self.busy_until - now)
    }

    /// A uniform draw in [0, 1) (xorshift; statistical quality is plenty for loss).
    fn chance(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }
}

async fn delay_line(mut rx: mpsc::Receiver<Delayed>) {
    let mut heap = BinaryHeap::new();
    loop {
        let next_due = heap.peek().map(|d: &Delayed| d.due);
        tokio::select! {
            got = rx.recv() => match got {
                Some(d) => heap.push(d),
                None => return,
            },
            _ = async { if let Some(due) = next_due { tokio::time::sleep_until(due).await } else { std::future::pending::<()>().await } } => {
                let now = Instant::now();
                while heap.peek().is_some_and(|d| d.due <= now) {
                    if let Some(d) = heap.pop() {
                        d.dest.send(&d.packet).await;
                    }
                }
            }
        }
    }
}

async fn run(front: Arc<UdpSocket>, upstream: SocketAddr, state: Arc<State>) {
    let mut tasks = JoinSet::new();
    let (line_tx, line_rx) = mpsc::channel(DELAY_QUEUE);
    tasks.spawn(delay_line(line_rx));
    let mut seed = [0u8; 8];
    let _ = getrandom::fill(&mut seed);
    let mut shaper = Shaper {
        state: state.clone(),
        rng: u64::from_le_bytes(seed) | 1,
        line: line_tx.clone(),
        order: 0,
        upstream: true,
        busy_until: Instant::now(),
    };
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, from)) = front.recv_from(&mut buf).await else {
            continue;
        };
        let up = match clients.get(&from) {
            Some(up) => up.clone(),
            None => {
                if clients.len() >= MAX_CLIENTS {
                    continue;
                }
                let Ok(up) = bind("127.0.0.1:0".parse().expect("literal address")) else {
                    continue;
                };
                if up.connect(upstream).await.is_err() {
                    continue;
                }
                let up = Arc::new(up);
                clients.insert(from, up.clone());
                tasks.spawn(backward(
                    up.clone(),
                    front.clone(),
                    from,
                    Shaper {
                        state: state.clone(),
                        rng: shaper.rng.rotate_left(17) | 1,
                        line: line_tx.clone(),
                        order: 0,
                        upstream: false,
                        busy_until: Instant::now(),
                    },
                ));
                up
            }
        };
        shaper.forward(buf[..n].to_vec(), Dest::Upstream(up)).await;
    }
}

/// Carries one client's datagrams from the upstream back to it.
async fn backward(
    up: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    mut shaper: Shaper,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while let Ok(n) = up.recv(&mut buf).await {
        shaper
            .forward(buf[..n].to_vec(), Dest::Client(front.clone(), client))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn forwards_delays_and_blackholes() -> std::io::Result<()> {
        let echo = UdpSocket::bind("127.0.0.1:0").await?;
        let echo_addr = echo.local_addr()?;
        let mut echo_task = JoinSet::new();
        echo_task.spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                let _ = echo.send_to(&buf[..n], from).await;
            }
        });
        let proxy = UdpProxy::start(echo_addr).await?;
        let client = UdpSocket::bind("127.0.0.1:0").await?;
        client.connect(proxy.local_addr()).await?;
        let mut buf = [0u8; 1500];

        client.send(b"ping").await?;
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf)).await??;
        assert_eq!(&buf[..n], b"ping");

        proxy.set_impairment(Impairment {
            delay: Duration::from_millis(20),
            ..Impairment::default()
        });
        let sent = Instant::now();
        client.send(b"slow").await?;
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf)).await??;
        assert_eq!(&buf[..n], b"slow");
        // Two delayed hops; a lower bound is safe to assert, unlike an upper one.
        assert!(sent.elapsed() >= Duration::from_millis(40));

        proxy.set_impairment(Impairment::default());
        proxy.blackhole(true);
        client.send(b"lost").await?;
        let r = tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf)).await;
        assert!(r.is_err(), "a blackholed proxy must not answer");
        assert!(proxy.counts().1 >= 1);
        Ok(())
    }

    #[tokio::test]
    async fn a_bottleneck_queues_then_drops_and_lifts() -> std::io::Result<()> {
        let sink = UdpSocket::bind("127.0.0.1:0").await?;
        let proxy = UdpProxy::start(sink.local_addr()?).await?;
        let client = UdpSocket::bind("127.0.0.1:0").await?;
        client.connect(proxy.local_addr()).await?;
        // 8 kbit/s with a 100 ms queue holds two 500-byte datagrams at most; a burst of
        // 50 overflows it (unless sending 50 datagrams took seconds).
        proxy.set_upstream_limit(Some(RateLimit {
            bits_per_second: 8_000,
            queue: Duration::from_millis(100),
        }));
        for _ in 0..50 {
            client.send(&[7u8; 500]).await?;
        }
        let mut buf = [0u8; 1500];
        let n = tokio::time::timeout(Duration::from_secs(5), sink.recv(&mut buf)).await??;
        assert_eq!(n, 500);
        let (_, dropped) = proxy.counts();
        assert!(dropped >= 1, "the queue never overflowed");

        proxy.set_upstream_limit(None);
        // Past anything still queued: a datagram sent now is not behind the bottleneck.
        client.send(b"free").await?;
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let n = sink.recv(&mut buf).await?;
                if &buf[..n] == b"free" {
                    return Ok::<_, std::io::Error>(());
                }
            }
        })
        .await?
    }

    #[test]
    fn profiles_exist() {
        for p in Impairment::PROFILES {
            assert!(Impairment::profile(p).is_some(), "{p}");
        }
        assert!(Impairment::profile("nope").is_none());
    }
}
