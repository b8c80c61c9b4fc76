//! Where `jitgated` logs: the journal with structured fields when systemd connected our
//! stderr to it, else text (or JSON lines) on stderr.

use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, util::SubscriberInitExt as _};

/// Whether stderr is the journal stream systemd set up (`JOURNAL_STREAM` is `device:inode`
/// of that stream; a redirected stderr no longer matches and keeps plain output).
fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr()) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

/// Installs the global subscriber. `JITGATE_LOG` filters (default `info`).
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_env("JITGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if !json && stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(layer) => {
                tracing_subscriber::registry()
                    .with(filter)
                    .with(layer.with_syslog_identifier("jitgated".into()))
                    .init();
                return;
            }
            Err(e) => eprintln!("jitgated: journald unavailable ({e}); logging to stderr"),
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
