//! The Kubernetes API server stand-in of the tests (tests/src/kube_fixture.rs) as a process,
//! for `cargo xtask demo`: `jitgate-kube-standin LISTEN CA_OUT` serves HTTPS on LISTEN with
//! a certificate for 127.0.0.1 signed by a CA it writes to CA_OUT, prints `ready`, and
//! serves until killed.

use std::path::Path;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(ca_out)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: jitgate-kube-standin LISTEN CA_OUT");
        std::process::exit(2);
    };
    let _fixture = jitgate_e2e::http_fixture::HttpFixture::kube_at(listen, Path::new(ca_out));
    println!("ready");
    loop {
        std::thread::park();
    }
}
