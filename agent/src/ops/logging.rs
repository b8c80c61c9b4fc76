//! Where `jitgated` logs: the journal with structured fields when systemd connected our
//! stderr to it, else text (or JSON lines) on stderr.

use tracing::Subscriber;
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{LevelFilter, Targets},
    fmt,
    layer::SubscriberExt as _,
    registry::LookupSpan,
    util::SubscriberInitExt as _,
};

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

/// The filter `spec` (a `JITGATE_LOG` value) asks for; `info` when it is unset or invalid.
///
/// A plain spec (`info`, `jitgate=debug,hyper=warn`) becomes a static [`Targets`] filter.
/// [`EnvFilter`] serves span directives (`jitgate[session{id=...}]=trace`) by taking a shared
/// lock at every span enter and exit, and every poll of a session enters its span: on the
/// data path that lock is paid per request whatever the spec, so only a spec that uses span
/// directives gets it.
fn filter<S>(spec: Option<&str>) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let spec = spec
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or("info");
    if let Some(targets) = static_targets(spec) {
        return Box::new(targets);
    }
    Box::new(EnvFilter::try_new(spec).unwrap_or_else(|e| {
        eprintln!("jitgated: JITGATE_LOG={spec:?} is not a filter ({e}); logging at info");
        EnvFilter::new("info")
    }))
}

/// `spec` as a static filter when every directive in it is plain (`level`, `target` or
/// `target=level`, the target a module path), which [`Targets`] reads exactly as
/// [`EnvFilter`] does. Anything else (span directives, empty directives, spaces, stray
/// characters) is left to `EnvFilter`, which tolerates or refuses it as it always has:
/// `Targets` would read an empty directive (`info,`) as TRACE for every crate, and
/// accept ` jitgate=debug` as a target that matches nothing.
fn static_targets(spec: &str) -> Option<Targets> {
    let plain = |directive: &str| {
        let (target, level) = match directive.split_once('=') {
            Some((target, level)) => (target, Some(level)),
            None => (directive, None),
        };
        !target.is_empty()
            && target
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'-'))
            // An empty level is TRACE to EnvFilter but ERROR to Targets.
            && level.is_none_or(|l| !l.is_empty() && l.parse::<LevelFilter>().is_ok())
    };
    if !spec.split(',').all(plain) {
        return None;
    }
    spec.parse().ok()
}

/// Installs the global subscriber. `JITGATE_LOG` filters (default `info`).
pub fn init(json: bool) {
    let spec = std::env::var("JITGATE_LOG").ok();
    let registry = tracing_subscriber::registry().with(filter(spec.as_deref()));
    if !json && stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(layer) => {
                registry
                    .with(layer.with_syslog_identifier("jitgated".into()))
                    .init();
                return;
            }
            Err(e) => eprintln!("jitgated: journald unavailable ({e}); logging to stderr"),
        }
    }
    // As `fmt()` had it: the layer reports its own formatting and write errors on stderr
    // (`json()` keeps the writer and that setting).
    let stderr = fmt::layer()
        .with_writer(std::io::stderr)
        .log_internal_errors(true);
    if json {
        registry.with(stderr.json()).init();
    } else {
        registry.with(stderr).init();
    }
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::*;

    #[test]
    fn plain_specs_filter_statically_as_env_filter_would() {
        let t = static_targets("info,jitgate=debug,hyper=warn").expect("a plain spec");
        assert!(t.would_enable("jitgate::http::session", &Level::DEBUG));
        assert!(!t.would_enable("jitgate::http::session", &Level::TRACE));
        assert!(!t.would_enable("hyper::proto::h1", &Level::INFO));
        assert!(t.would_enable("hyper::proto::h1", &Level::WARN));
        assert!(t.would_enable("rustls", &Level::INFO));
        assert!(!t.would_enable("rustls", &Level::DEBUG));
        let t = static_targets("jitgate").expect("a target alone");
        assert!(t.would_enable("jitgate::proxy", &Level::TRACE));
        assert!(!t.would_enable("tokio", &Level::ERROR));
    }

    #[test]
    fn span_directives_and_nonsense_are_not_static() {
        for spec in [
            "jitgate[session]=trace",
            "info,jitgate[session{identity=ci}]=debug",
            "[{session=7}]=trace",
            // EnvFilter drops empty directives; Targets would turn one into TRACE for
            // every crate.
            "info,",
            "info,,jitgate=debug",
            ",",
        ] {
            assert!(static_targets(spec).is_none(), "{spec:?}");
            assert!(
                EnvFilter::try_new(spec).is_ok(),
                "{spec:?} is an EnvFilter spec"
            );
        }
        // Targets would take the first three (a space or `;` in a target, an empty target
        // matching everything); EnvFilter reads them as it always has (refusing some, and
        // the agent says so).
        for spec in [
            "warn, jitgate=debug",
            "=debug",
            "info;jitgate=debug",
            "jitgate=loud",
            "jitgate=debug=x",
            "jitgate=",
            "info,hyper=",
        ] {
            assert!(static_targets(spec).is_none(), "{spec:?}");
        }
        for spec in ["warn, jitgate=debug", "=debug", "jitgate=loud"] {
            assert!(EnvFilter::try_new(spec).is_err(), "{spec:?}");
        }
    }
}
