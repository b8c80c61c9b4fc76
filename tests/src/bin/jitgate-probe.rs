//! A client that tries every way a workload might reach a destination, for the end-to-end
//! tests. Prints one line: `ok <what it read>` or `err <errno> <message>`; exits 0 or 1.
//!
//! ```text
//! jitgate-probe connect ADDR      TCP connect, read the server's banner, print the peer
//! jitgate-probe from LOCAL ADDR   the same from the local address LOCAL (bound first)
//! jitgate-probe iouring ADDR      the same with IORING_OP_CONNECT
//! jitgate-probe tfo ADDR          the same with sendto(MSG_FASTOPEN)
//! jitgate-probe udp ADDR          send one datagram
//! jitgate-probe raw               open a raw ICMP socket
//! jitgate-probe bind ADDR         bind a TCP socket
//! jitgate-probe hold ADDR         connect, echo pings until the connection is cut; prints
//!                                 `closed <unix ms> <why>`
//! jitgate-probe squat PORT SECS   for SECS seconds, let the kernel pick ports (listen() and
//!                                 bind(0) on unbound IPv4 and IPv6 sockets) until none is
//!                                 left, then start over; `ok got PORT` if it was handed PORT
//! ```

use std::{
    io::{self, Read as _, Write as _},
    mem::size_of,
    net::{SocketAddr, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is valid; we fill the family-specific prefix.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn socket(addr: SocketAddr, kind: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn peer(fd: RawFd) -> String {
    // SAFETY: zeroed storage, valid length.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: valid buffer and length.
    if unsafe { libc::getpeername(fd, std::ptr::from_mut(&mut storage).cast(), &mut len) } != 0 {
        return "?".into();
    }
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read(std::ptr::from_ref(&storage).cast()) };
            let ip = std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            format!("{ip}:{}", u16::from_be(sin.sin_port))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read(std::ptr::from_ref(&storage).cast()) };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            format!("[{ip}]:{}", u16::from_be(sin6.sin6_port))
        }
        _ => "?".into(),
    }
}

/// Reads what the server says first (the tests' upstream greets every connection).
fn banner(mut stream: TcpStream) -> io::Result<String> {
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut buf = [0u8; 256];
    let n = stream.read(&mut buf)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed without a byte",
        ));
    }
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

fn connect_plain(addr: SocketAddr) -> io::Result<String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    let p = peer(stream.as_raw_fd());
    Ok(format!("{} peer={p}", banner(stream)?))
}

fn connect_from(local: SocketAddr, addr: SocketAddr) -> io::Result<String> {
    let fd = socket(addr, libc::SOCK_STREAM, 0)?;
    let (storage, len) = sockaddr(local);
    // SAFETY: valid socket and address.
    if unsafe { libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&storage).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (storage, len) = sockaddr(addr);
    // SAFETY: valid socket and address.
    if unsafe { libc::connect(fd.as_raw_fd(), std::ptr::from_ref(&storage).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let p = peer(fd.as_raw_fd());
    Ok(format!("{} peer={p}", banner(TcpStream::from(fd))?))
}

fn connect_iouring(addr: SocketAddr) -> io::Result<String> {
    let fd = socket(addr, libc::SOCK_STREAM, 0)?;
    let (storage, len) = sockaddr(addr);
    let mut ring = io_uring::IoUring::new(4)?;
    let op = io_uring::opcode::Connect::new(
        io_uring::types::Fd(fd.as_raw_fd()),
        std::ptr::from_ref(&storage).cast(),
        len,
    )
    .build();
    // SAFETY: `storage` outlives the submission, which completes before we return.
    unsafe {
        ring.submission()
            .push(&op)
            .map_err(|_| io::Error::other("ring full"))?
    };
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| io::Error::other("no completion"))?;
    if cqe.result() < 0 {
        return Err(io::Error::from_raw_os_error(-cqe.result()));
    }
    let p = peer(fd.as_raw_fd());
    Ok(format!("{} peer={p}", banner(TcpStream::from(fd))?))
}

fn connect_tfo(addr: SocketAddr) -> io::Result<String> {
    let fd = socket(addr, libc::SOCK_STREAM, 0)?;
    let (storage, len) = sockaddr(addr);
    let data = b"x";
    // SAFETY: valid buffers.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_FASTOPEN,
            std::ptr::from_ref(&storage).cast(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let p = peer(fd.as_raw_fd());
    Ok(format!("{} peer={p}", banner(TcpStream::from(fd))?))
}

fn udp(addr: SocketAddr) -> io::Result<String> {
    let fd = socket(addr, libc::SOCK_DGRAM, 0)?;
    let (storage, len) = sockaddr(addr);
    let data = b"probe";
    // SAFETY: valid buffers.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            0,
            std::ptr::from_ref(&storage).cast(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(format!("sent {rc} bytes"))
}

fn raw() -> io::Result<String> {
    let fd = socket(
        "0.0.0.0:0".parse().expect("literal"),
        libc::SOCK_RAW,
        libc::IPPROTO_ICMP,
    )?;
    Ok(format!("raw socket {}", fd.as_raw_fd()))
}

fn bind(addr: SocketAddr) -> io::Result<String> {
    let fd = socket(addr, libc::SOCK_STREAM, 0)?;
    let (storage, len) = sockaddr(addr);
    // SAFETY: valid address buffer.
    if unsafe { libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&storage).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(format!("bound {addr}"))
}

fn local_port(fd: &OwnedFd) -> io::Result<u16> {
    // SAFETY: zeroed sockaddr_storage is a valid output buffer of the given length.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: valid socket and buffer.
    if unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            std::ptr::from_mut(&mut storage).cast(),
            &mut len,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // sin_port and sin6_port sit at the same offset.
    // SAFETY: the kernel wrote a sockaddr_in or sockaddr_in6.
    let sin: libc::sockaddr_in = unsafe { std::ptr::read(std::ptr::from_ref(&storage).cast()) };
    Ok(u16::from_be(sin.sin_port))
}

/// Takes every port the kernel hands out, the ways a workload can get one without naming it.
fn squat(port: u16, secs: u64) -> io::Result<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let v4: SocketAddr = "0.0.0.0:0".parse().expect("literal");
    let v6: SocketAddr = "[::]:0".parse().expect("literal");
    let (mut handed, mut rounds) = (0u64, 0u64);
    while std::time::Instant::now() < deadline {
        rounds += 1;
        let mut held = Vec::new();
        for i in 0u64.. {
            let family = if i % 2 == 0 { v4 } else { v6 };
            let Ok(fd) = socket(family, libc::SOCK_STREAM, 0) else {
                break;
            };
            let rc = if i % 3 == 0 {
                let (storage, len) = sockaddr(family);
                // SAFETY: valid address buffer.
                unsafe { libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&storage).cast(), len) }
            } else {
                // SAFETY: valid socket; listen on an unbound socket autobinds it.
                unsafe { libc::listen(fd.as_raw_fd(), 1) }
            };
            if rc != 0 {
                break;
            }
            handed += 1;
            if local_port(&fd)? == port {
                return Ok(format!("got {port} after {handed} ports"));
            }
            held.push(fd);
            if held.len() > 70_000 {
                break;
            }
        }
        drop(held);
    }
    Err(io::Error::other(format!(
        "never handed {port}: {handed} ports in {rounds} rounds"
    )))
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn hold(addr: SocketAddr) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    // Long enough to outlast a paused agent (the fleet tests stop one for as long as the
    // store takes to prune its change log): the connection is held until the gate ends it.
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut buf = [0u8; 256];
    let n = stream.read(&mut buf)?;
    println!("connected {}", String::from_utf8_lossy(&buf[..n]).trim());
    io::stdout().flush()?;
    loop {
        let why = match stream.write_all(b"ping\n") {
            Err(e) => e.to_string(),
            Ok(()) => match stream.read(&mut buf) {
                Ok(0) => "eof".to_owned(),
                Ok(_) => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => e.to_string(),
            },
        };
        return Ok(format!("closed {} {why}", now_ms()));
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr = |i: usize| -> io::Result<SocketAddr> {
        args.get(i)
            .ok_or_else(|| io::Error::other("missing address"))?
            .parse()
            .map_err(|e| io::Error::other(format!("bad address: {e}")))
    };
    let result = match args.first().map(String::as_str) {
        Some("connect") => addr(1).and_then(connect_plain),
        Some("from") => addr(1).and_then(|local| connect_from(local, addr(2)?)),
        Some("iouring") => addr(1).and_then(connect_iouring),
        Some("tfo") => addr(1).and_then(connect_tfo),
        Some("udp") => addr(1).and_then(udp),
        Some("raw") => raw(),
        Some("bind") => addr(1).and_then(bind),
        Some("hold") => addr(1).and_then(hold),
        Some("squat") => match (
            args.get(1).and_then(|p| p.parse().ok()),
            args.get(2).and_then(|s| s.parse().ok()),
        ) {
            (Some(port), Some(secs)) => squat(port, secs),
            _ => Err(io::Error::other("usage: squat PORT SECS")),
        },
        _ => {
            eprintln!(
                "usage: jitgate-probe connect|iouring|tfo|udp|bind|hold ADDR | from LOCAL ADDR | raw"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(text) => {
            println!("ok {text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("err {} {e}", e.raw_os_error().unwrap_or(0));
            ExitCode::FAILURE
        }
    }
}
