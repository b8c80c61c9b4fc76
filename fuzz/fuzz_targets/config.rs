//! The daemon's configuration: TOML, then validation with file, line and key in every error.
//! A config is the operator's, not a workload's, but a hostile or mangled file must give an
//! error, never a panic.
#![no_main]

use jitgate::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::from_toml(std::path::Path::new("fuzz.toml"), text);
    }
});
