//! A workload's first bytes and the messages after them: the startup family (SSLRequest,
//! GSSENCRequest, CancelRequest, StartupMessage with its parameters and `options`), then
//! message framing with its size caps, field lists and C strings. Nothing may panic, hang or
//! allocate beyond the caps, whatever arrives.
#![no_main]

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use jitgate::{
    postgres::{
        config::ClientTls,
        options, shape,
        startup::{self, Deadline, Opening},
        wire::{self, take_cstr, take_i16, take_i32},
    },
    protocol::Conn,
};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    runtime.block_on(session(data.to_vec()));
});

async fn session(data: Vec<u8>) {
    let (mut workload, gate_end) = tokio::io::duplex(64 * 1024);
    // The workload writes everything, then reads whatever the gate answers (an 'N' to an
    // SSLRequest, errors) so the pipe never fills.
    let workload_task = tokio::spawn(async move {
        let _ = workload.write_all(&data).await;
        let _ = workload.shutdown().await;
        let mut sink = Vec::new();
        let _ = workload.read_to_end(&mut sink).await;
    });
    let deadline = Deadline {
        at: tokio::time::Instant::now() + Duration::from_secs(5),
        timeout: Duration::from_secs(5),
    };
    let opened = startup::open(
        Conn::from(gate_end),
        ClientTls::Disable,
        None,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        deadline,
    )
    .await;
    // Whatever the outcome holds of the connection is dropped before the workload's reader
    // is awaited: it waits for the gate's end to close.
    let Ok(Opening::Session {
        params,
        mut reader,
        writer,
        ..
    }) = opened
    else {
        drop(opened);
        let _ = workload_task.await;
        return;
    };
    drop(writer);
    {
        for (name, value) in &params {
            if name == "options" {
                let _ = options::parse(value);
            }
        }
        while let Ok(Some(frame)) = reader.next().await {
            let mut body = frame.body.clone();
            match frame.tag {
                b'Q' => {
                    if let Ok(text) = take_cstr(&mut body) {
                        let _ = shape::shape(&text);
                    }
                }
                b'P' => {
                    let _ = take_cstr(&mut body);
                    let _ = take_cstr(&mut body);
                    if let Ok(n) = take_i16(&mut body) {
                        for _ in 0..n.max(0) {
                            if take_i32(&mut body).is_err() {
                                break;
                            }
                        }
                    }
                }
                b'E' | b'N' => {
                    let _ = wire::parse_fields(frame.body.clone());
                }
                _ => {
                    let _ = take_cstr(&mut body);
                }
            }
        }
    }
    drop(reader);
    let _ = workload_task.await;
}
