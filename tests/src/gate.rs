//! A TCP relay that can be shut: when closed, every connection through it is dropped at once,
//! so whatever is behind it is unreachable to the control plane while tests still reach it
//! directly.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub struct Gate {
    pub port: u16,
    open: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<TcpStream>>>,
}

impl Gate {
    /// A gate on a free loopback port relaying to `127.0.0.1:<target>`, open.
    pub fn start(target: u16) -> anyhow::Result<Gate> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let open = Arc::new(AtomicBool::new(true));
        let live = Arc::new(Mutex::new(Vec::new()));
        let (is_open, connections) = (open.clone(), live.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if !is_open.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                if let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) {
                    connections.lock().expect("not poisoned").extend([c, s]);
                }
                relay(client, server);
            }
        });
        Ok(Gate { port, open, live })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Opens or shuts the gate; shutting it also cuts the connections already through it.
    pub fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
        if !open {
            for stream in self.live.lock().expect("not poisoned").drain(..) {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }
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
