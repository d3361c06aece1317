//! Whether the ports `cargo xtask dev` needs are free, and if not, which process holds each:
//! read from `/proc/net/tcp{,6}` (the listening socket's inode) and `/proc/<pid>/fd` (who has
//! that socket open), as `ss -ltnp` does.

use std::net::TcpListener;

/// Fails at the first port that cannot be bound on 127.0.0.1, naming it and its holder.
pub fn check_free(ports: &[u16]) -> anyhow::Result<()> {
    for &port in ports {
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            continue;
        }
        let holder = match holder(port) {
            Some((pid, name)) => format!("held by pid {pid} ({name})"),
            None => {
                format!("in use, by no process this user can see (`ss -ltnp 'sport = :{port}'` as root may say which)")
            }
        };
        let all: Vec<String> = ports.iter().map(u16::to_string).collect();
        anyhow::bail!(
            "port {port} is {holder}. `cargo xtask dev` needs ports {} on 127.0.0.1: stop that program, then run it again",
            all.join(", ")
        );
    }
    Ok(())
}

/// The process (pid, command name) holding a socket that listens on `port`, if this user can
/// see it.
pub fn holder(port: u16) -> Option<(u32, String)> {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|inode| format!("socket:[{inode}]")).collect();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| wanted.iter().any(|w| target.as_os_str() == w.as_str()))
        });
        if holds {
            let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            return Some((pid, name.trim().to_owned()));
        }
    }
    None
}

/// The inodes of the sockets listening on `port`, IPv4 or IPv6, any address.
fn listening_inodes(port: u16) -> Vec<u64> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        // `sl local_address rem_address st ... inode`, the local address as `HEX_IP:HEX_PORT`;
        // state 0A is LISTEN.
        for fields in text.lines().skip(1).map(|line| line.split_whitespace().collect::<Vec<_>>()) {
            let local_port = fields.get(1).and_then(|a| a.rsplit_once(':')).map(|(_, p)| p);
            if local_port.and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port)
                && fields.get(3) == Some(&"0A")
                && let Some(inode) = fields.get(9).and_then(|i| i.parse().ok())
            {
                inodes.push(inode);
            }
        }
    }
    inodes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_port_is_named_with_its_holder() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a port");
        let port = listener.local_addr().expect("address").port();
        let error = check_free(&[port]).expect_err("the port is held").to_string();
        // Normally this process; a process another test forked from it holds the socket too
        // until its exec closes it.
        assert!(error.contains(&format!("port {port} is held by pid ")), "{error}");
        assert!(error.contains("needs ports"), "{error}");
        drop(listener);
        check_free(&[port]).expect("free again");
    }

    #[test]
    fn a_port_nobody_listens_on_has_no_holder() {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a port").port();
        assert_eq!(holder(port), None);
    }
}
