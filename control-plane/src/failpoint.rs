//! Failpoints for crash tests: `KEYWARD_FAILPOINT=<name>` makes the process abort (like
//! `kill -9`: no cleanup, no answer) when it reaches the point with that name.

/// Aborts the process if `KEYWARD_FAILPOINT` names this point.
pub fn hit(name: &str) {
    if std::env::var("KEYWARD_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}
