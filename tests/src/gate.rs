//! A TCP relay a test can break in the two ways a network path fails: refusing (every
//! connection is cut at once, as a closed port fails fast) and hanging (connections are
//! accepted and held, never answered, as a stopped process or a stuck path behaves), plus
//! answering every request with an HTTP error while connections work. Whatever
//! is behind it stays reachable to tests directly.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

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

pub struct Gate {
    pub port: u16,
    mode: Arc<AtomicU8>,
    live: Arc<Mutex<Vec<TcpStream>>>,
}

impl Gate {
    /// A gate on a free loopback port relaying to `127.0.0.1:<target>`, open.
    pub fn start(target: u16) -> anyhow::Result<Gate> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let mode = Arc::new(AtomicU8::new(GateMode::Open as u8));
        let live = Arc::new(Mutex::new(Vec::new()));
        let (current, connections) = (mode.clone(), live.clone());
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
                relay(client, server);
            }
        });
        Ok(Gate { port, mode, live })
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

fn relay(client: TcpStream, server: TcpStream) {
    let pairs = [(client.try_clone(), server.try_clone()), (server.try_clone(), client.try_clone())];
    for pair in pairs {
        if let (Ok(mut from), Ok(mut to)) = pair {
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 || to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = to.shutdown(Shutdown::Write);
            });
        }
    }
}
