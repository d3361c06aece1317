//! A TCP relay a test can break in the two ways a network path fails: refusing (every
//! connection is cut at once, as a closed port fails fast) and hanging (connections are
//! accepted and held, never answered, as a stopped process or a stuck path behaves), plus
//! answering every request with an HTTP error while connections work. Whatever
//! is behind it stays reachable to tests directly.
//!
//! A gate may also hold every chunk it relays for a [`Link`]'s one-way delay, each direction
//! on its own, in order: the geography model's relays ([`crate::geography`]). It counts what
//! it relayed and the delays it applied ([`LinkStats`]), so a run can show they happened.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::geography::Link;

/// How the gate treats connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateMode {
    Open,
    /// Cut every connection at once.
    Refuse,
    /// Accept and hold every new connection without relaying a byte.
    Hang,
    /// Answer every request `503 Service Unavailable` (a worker that refuses the caller: a wrong
    /// secret, a failing deployment) while connections work.
    Error,
}

impl GateMode {
    fn from_u8(v: u8) -> GateMode {
        match v {
            0 => GateMode::Open,
            1 => GateMode::Refuse,
            2 => GateMode::Hang,
            _ => GateMode::Error,
        }
    }
}

/// What a delayed gate relayed in one direction since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DirectionStats {
    pub chunks: u64,
    pub bytes: u64,
    /// Sum and largest of the time each chunk was held, from its arrival until it was written
    /// on (the applied delay, as measured, not as drawn).
    pub held_ms_sum: f64,
    pub held_ms_max: f64,
}

impl DirectionStats {
    pub fn held_ms_mean(&self) -> f64 {
        if self.chunks == 0 { f64::NAN } else { self.held_ms_sum / self.chunks as f64 }
    }
}

/// What a delayed gate relayed: towards its target (`forward`) and back.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkStats {
    pub forward: DirectionStats,
    pub back: DirectionStats,
}

pub struct Gate {
    pub port: u16,
    mode: Arc<AtomicU8>,
    live: Arc<Mutex<Vec<TcpStream>>>,
    counters: Arc<Mutex<LinkStats>>,
}

impl Gate {
    /// A gate on a free loopback port relaying to `127.0.0.1:<target>`, open.
    pub fn start(target: u16) -> anyhow::Result<Gate> {
        Gate::start_with(target, None)
    }

    /// A gate relaying to `127.0.0.1:<target>`, open, holding each chunk for `link`'s delay
    /// in each direction when one is given.
    pub fn start_with(target: u16, link: Option<Link>) -> anyhow::Result<Gate> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let mode = Arc::new(AtomicU8::new(GateMode::Open as u8));
        let live = Arc::new(Mutex::new(Vec::new()));
        let counters = Arc::new(Mutex::new(LinkStats::default()));
        let (current, connections, counted) = (mode.clone(), live.clone(), counters.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                match GateMode::from_u8(current.load(Ordering::SeqCst)) {
                    GateMode::Refuse => {
                        let _ = client.shutdown(Shutdown::Both);
                        continue;
                    }
                    GateMode::Hang => {
                        connections.lock().expect("not poisoned").push(client);
                        continue;
                    }
                    GateMode::Error => {
                        std::thread::spawn(move || answer_503(client));
                        continue;
                    }
                    GateMode::Open => {}
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                if let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) {
                    connections.lock().expect("not poisoned").extend([c, s]);
                }
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                relay(client, server, link.map(|link| (link, counted.clone())));
            }
        });
        Ok(Gate { port, mode, live, counters })
    }

    /// What the gate relayed and the delays it applied (zeros unless it has a [`Link`]).
    pub fn stats(&self) -> LinkStats {
        *self.counters.lock().expect("not poisoned")
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Opens or shuts (refusing) the gate.
    pub fn set_open(&self, open: bool) {
        self.set_mode(if open { GateMode::Open } else { GateMode::Refuse });
    }

    /// Changes how the gate treats connections.
    pub fn set_mode(&self, mode: GateMode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
        // Whatever was open through the gate (or held by it) is cut; new connections follow
        // the new mode.
        for stream in self.live.lock().expect("not poisoned").drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// Reads a request's head and answers 503, closing the connection.
fn answer_503(mut client: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    let mut seen = Vec::new();
    while let Ok(n) = client.read(&mut buf) {
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        if seen.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let body = "{\"error\":{\"code\":\"GATE\",\"message\":\"refused by the test gate\"}}";
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = client.write_all(head.as_bytes()).and_then(|()| client.write_all(body.as_bytes()));
    let _ = client.shutdown(Shutdown::Both);
}

/// A link's delay on one connection: the link and the gate's counters.
type Delayed = (Link, Arc<Mutex<LinkStats>>);

fn relay(client: TcpStream, server: TcpStream, delay: Option<Delayed>) {
    let pairs = [(client.try_clone(), server.try_clone(), true), (server.try_clone(), client.try_clone(), false)];
    for (from, to, forward) in pairs {
        let (Ok(from), Ok(to)) = (from, to) else { continue };
        match delay.clone() {
            None => {
                std::thread::spawn(move || pump(from, to));
            }
            Some(delay) => pump_delayed(from, to, forward, delay),
        }
    }
}

/// Copies `from` to `to` until either ends.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Copies `from` to `to`, each chunk written a draw of the link's delay after it was read and
/// never before an earlier chunk: a reader thread stamps chunks, a writer thread holds them.
fn pump_delayed(mut from: TcpStream, mut to: TcpStream, forward: bool, (link, counters): Delayed) {
    let (send, receive) = mpsc::channel::<(Instant, Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        let mut last_release = Instant::now();
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            let arrived = Instant::now();
            last_release = (arrived + link.sample()).max(last_release);
            if send.send((arrived, last_release, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for (arrived, release, chunk) in receive {
            std::thread::sleep(release.saturating_duration_since(Instant::now()));
            if to.write_all(&chunk).is_err() {
                break;
            }
            count(&counters, forward, chunk.len(), arrived.elapsed());
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

fn count(counters: &Mutex<LinkStats>, forward: bool, bytes: usize, held: Duration) {
    let mut counters = counters.lock().expect("not poisoned");
    let stats = if forward { &mut counters.forward } else { &mut counters.back };
    stats.chunks += 1;
    stats.bytes += bytes as u64;
    let held_ms = held.as_secs_f64() * 1e3;
    stats.held_ms_sum += held_ms;
    stats.held_ms_max = stats.held_ms_max.max(held_ms);
}
