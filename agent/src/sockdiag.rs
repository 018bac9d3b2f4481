//! The TCP sockets listening in a network namespace, from the kernel's
//! sock_diag netlink interface.
//!
//! Why not /proc/PID/net/tcp: that table prints every TCP socket of the
//! namespace, and after a connection flood a node's namespace holds up to
//! `tcp_max_tw_buckets` (131,072 here) TIME_WAIT sockets: about 20 ms of the
//! kernel's time per 17,000 rows, under the hash locks the node's own
//! accepts take, every interval. A dump asking for the LISTEN state only
//! walks the listening hash and skips the established one (inet_diag), so
//! its cost follows the number of listeners, not of connections.

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

/// Listeners read per family at most: past it the dump is an error, and
/// the caller reads the namespace's TCP tables instead.
pub const MAX_LISTENERS: usize = 65_536;

/// Room for one netlink datagram of a dump (the kernel fills up to 32 KiB).
const RECV_BUF: usize = 64 * 1024;

/// How long one receive of a dump may wait. The kernel answers a dump
/// request at once; past this, the dump is an error (the caller reads the
/// TCP tables instead) rather than a collection stuck for good.
const RECV_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// (socket inode, local port) of every TCP socket listening in the calling
/// thread's network namespace, IPv4 and IPv6.
pub fn listeners() -> std::io::Result<Vec<(u64, u16)>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    set_recv_timeout(&socket, RECV_TIMEOUT)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump(&socket, family, &mut out)?;
    }
    Ok(out)
}

fn set_recv_timeout(socket: &Socket, timeout: std::time::Duration) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid socket descriptor and a timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn dump(socket: &Socket, family: u8, out: &mut Vec<(u64, u16)>) -> std::io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::LISTEN,
            socket_id: if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() },
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let start = out.len();
    let mut datagram: Vec<u8> = Vec::with_capacity(RECV_BUF);
    loop {
        datagram.clear();
        let size = socket.recv(&mut datagram, 0)?;
        if size > datagram.len() {
            return Err(bad(format!("sock_diag datagram of {size} bytes cut to {}", datagram.len())));
        }
        let mut offset = 0;
        while offset < datagram.len() {
            let message = <NetlinkMessage<SockDiagMessage>>::deserialize(&datagram[offset..])
                .map_err(|e| bad(format!("sock_diag reply: {e}")))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(_))
                    if out.len() - start >= MAX_LISTENERS =>
                {
                    return Err(bad(format!("more than {MAX_LISTENERS} listening sockets")));
                }
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    out.push((u64::from(r.header.inode), r.header.socket_id.source_port));
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(e.to_io());
                }
                _ => {}
            }
            if length == 0 {
                return Err(bad("sock_diag reply with a zero length".into()));
            }
            offset += length;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket this test listens on is in the dump, with its port and the
    /// inode /proc/self/fd names; a connected one is not.
    #[test]
    fn a_listener_of_ours_is_listed_with_its_inode() {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let link = std::fs::read_link(format!("/proc/self/fd/{}", listener.as_raw_fd())).unwrap();
        let inode: u64 = link.to_str().unwrap().trim_start_matches("socket:[").trim_end_matches(']').parse().unwrap();
        let all = listeners().unwrap();
        assert!(all.contains(&(inode, port)), "({inode}, {port}) not in {all:?}");
        assert!(all.iter().all(|(i, p)| *p != port || *i == inode), "a non-listening socket on {port}: {all:?}");
    }
}
