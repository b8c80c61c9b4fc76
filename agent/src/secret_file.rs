//! Files that hold secrets the agent uses on a workload's behalf or its own (database
//! passwords, API tokens, webhook signing keys): one rule for all of them. A secret file
//! must be a regular file owned by root or the agent's own user (anyone else could rewrite
//! it) that no one else can read. Fail closed: a file that breaks the rule is not used.

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
};

/// Why a secret file is not used. Each message says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("`{path}`: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("`{path}` belongs to uid {uid}, who could rewrite the secret; run `chown root {path}`")]
    Owner { path: String, uid: u32 },
    #[error(
        "`{path}` is readable by others (mode {mode:04o}); run `chmod 600 {path}` (owner root)"
    )]
    Mode { path: String, mode: u32 },
}

fn unreadable(path: &Path, reason: &str) -> SecretFileError {
    SecretFileError::Unreadable {
        path: path.display().to_string(),
        reason: reason.to_owned(),
    }
}

/// Checks the file behind `meta` (read from `path`) against the rule.
pub fn check(path: &Path, meta: &std::fs::Metadata) -> Result<(), SecretFileError> {
    if !meta.is_file() {
        return Err(unreadable(path, "not a file"));
    }
    let uid = meta.uid();
    if uid != 0 && uid != nix::unistd::geteuid().as_raw() {
        return Err(SecretFileError::Owner {
            path: path.display().to_string(),
            uid,
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::Mode {
            path: path.display().to_string(),
            mode,
        });
    }
    Ok(())
}

/// Checks `path` against the rule without reading it (configuration validation).
pub fn check_path(path: &Path) -> Result<(), SecretFileError> {
    let meta = std::fs::metadata(path).map_err(|e| unreadable(path, &e.to_string()))?;
    check(path, &meta)
}

/// The secret in `path`, without its trailing line end, once the file passes the rule. The
/// file is opened once and the rule checked on what was opened (the file a symbolic link
/// leads to), so it cannot be swapped between the check and the read.
pub fn read(path: &Path) -> Result<String, SecretFileError> {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| unreadable(path, &e.to_string()))?;
    let meta = file
        .metadata()
        .map_err(|e| unreadable(path, &e.to_string()))?;
    check(path, &meta)?;
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| unreadable(path, &e.to_string()))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn only_private_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "s3cret\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read(&file).unwrap(), "s3cret");
        for mode in [0o640, 0o604, 0o660] {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = read(&file).unwrap_err();
            assert!(matches!(e, SecretFileError::Mode { .. }), "{mode:o}: {e}");
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
        assert!(matches!(
            read(dir.path()),
            Err(SecretFileError::Unreadable { .. })
        ));
        assert!(matches!(
            read(&dir.path().join("missing")),
            Err(SecretFileError::Unreadable { .. })
        ));
        // Through a symbolic link, the rule applies to the file it leads to.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(read(&link), Err(SecretFileError::Mode { .. })));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read(&link).unwrap(), "s3cret");
    }
}
