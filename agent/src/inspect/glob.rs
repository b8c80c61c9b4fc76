//! Name patterns shared by every protocol's rules (tables, columns, functions, paths).

/// `*` and `?` globs, case-insensitive (callers lowercase both sides).
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn globs() {
        assert!(glob("*.email", "users.email"));
        assert!(glob("*.email", ".email"));
        assert!(glob("*password*", "users.password_hash"));
        assert!(glob("users.?d", "users.id"));
        assert!(!glob("users.email", "users.emails"));
        assert!(glob("pg_ls_*", "pg_ls_dir"));
    }
}
