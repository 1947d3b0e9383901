//! This process's TCP sockets, read from /proc. libunftp binds the control listener and the
//! passive ports itself and reports neither, so readiness (is the control port listening?) and
//! the passive-ports-in-use gauge look at the kernel's socket table instead.

use std::{collections::HashSet, fs, io, ops::RangeInclusive, path::Path};

/// TCP state numbers of the kernel's include/net/tcp_states.h, as /proc/net/tcp prints them.
const TCP_ESTABLISHED: u8 = 0x01;
const TCP_LISTEN: u8 = 0x0A;

/// One TCP socket of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    pub local_port: u16,
    pub state: u8,
}

impl TcpSocket {
    pub fn is_listening(&self) -> bool {
        self.state == TCP_LISTEN
    }

    pub fn is_established(&self) -> bool {
        self.state == TCP_ESTABLISHED
    }
}

/// Lists this process's IPv4 and IPv6 TCP sockets. A socket is ours when one of our file
/// descriptors points at its inode; sockets in TIME_WAIT belong to no process and are left out.
pub fn own_tcp_sockets() -> io::Result<Vec<TcpSocket>> {
    let inodes = own_socket_inodes()?;
    let mut sockets = Vec::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        match fs::read_to_string(table) {
            Ok(text) => sockets.extend(parse_table(&text, &inodes)),
            // A kernel without IPv6 has no tcp6 table.
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    Ok(sockets)
}

fn own_socket_inodes() -> io::Result<HashSet<u64>> {
    let mut inodes = HashSet::new();
    for entry in fs::read_dir("/proc/self/fd")? {
        // A descriptor closed between read_dir and read_link is simply skipped.
        let Ok(target) = fs::read_link(entry?.path()) else {
            continue;
        };
        if let Some(inode) = socket_inode(&target) {
            inodes.insert(inode);
        }
    }
    Ok(inodes)
}

/// Parses a descriptor's link target of the form `socket:[12345]`.
fn socket_inode(target: &Path) -> Option<u64> {
    target.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// Parses /proc/net/tcp or tcp6: a header line, then one line per socket whose fields are
/// `sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...`,
/// with the address as hex `IP:PORT` and the state as hex.
fn parse_table(text: &str, inodes: &HashSet<u64>) -> Vec<TcpSocket> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let inode: u64 = fields.get(9)?.parse().ok()?;
            if !inodes.contains(&inode) {
                return None;
            }
            let (_, port) = fields.get(1)?.rsplit_once(':')?;
            Some(TcpSocket {
                local_port: u16::from_str_radix(port, 16).ok()?,
                state: u8::from_str_radix(fields.get(3)?, 16).ok()?,
            })
        })
        .collect()
}

/// Returns true when this process listens on `port`.
pub fn listening_on(sockets: &[TcpSocket], port: u16) -> bool {
    sockets.iter().any(|socket| socket.local_port == port && socket.is_listening())
}

/// Counts the passive ports in use. A port with an open data connection is in use. A listening
/// port counts too unless `pooled`: pooled mode binds the whole range at start.
///
/// NOTE: in pooled mode a port reserved by PASV but not yet connected is not counted, because
/// the reservation lives only inside libunftp.
pub fn passive_ports_in_use(sockets: &[TcpSocket], range: &RangeInclusive<u16>, pooled: bool) -> usize {
    sockets
        .iter()
        .filter(|socket| range.contains(&socket.local_port))
        .filter(|socket| socket.is_established() || (!pooled && socket.is_listening()))
        .map(|socket| socket.local_port)
        .collect::<HashSet<u16>>()
        .len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_listener_and_connection_are_found() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sockets = own_tcp_sockets().unwrap();
        assert!(listening_on(&sockets, port), "{sockets:?}");
        assert_eq!(passive_ports_in_use(&sockets, &(port..=port), false), 1);
        assert_eq!(passive_ports_in_use(&sockets, &(port..=port), true), 0);

        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_server_side, _) = listener.accept().unwrap();
        let sockets = own_tcp_sockets().unwrap();
        assert_eq!(passive_ports_in_use(&sockets, &(port..=port), true), 1);

        drop(listener);
        let sockets = own_tcp_sockets().unwrap();
        assert!(!listening_on(&sockets, port));
    }

    #[test]
    fn table_lines_parse() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:0849 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:0850 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0\n";
        let sockets = parse_table(text, &HashSet::from([4242]));
        assert_eq!(
            sockets,
            vec![TcpSocket {
                local_port: 2121,
                state: TCP_LISTEN
            }]
        );
    }
}
