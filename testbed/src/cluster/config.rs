//! What the bed writes into a fresh cluster: postgresql.conf settings and pg_hba.conf.

use std::fmt::Write as _;

/// The bootstrap superuser; trusted on the socket and on 127.0.0.1.
pub const SUPERUSER: &str = "postgres";

/// The password of every password role.
pub const PASSWORD: &str = "pitr-test-password";

/// Roles with LOGIN and REPLICATION that must authenticate with [`PASSWORD`], and the
/// pg_hba method each is checked with (for authentication tests).
pub const PASSWORD_ROLES: [(&str, &str); 3] = [
    ("pitr_scram", "scram-sha-256"),
    ("pitr_md5", "md5"),
    ("pitr_password", "password"),
];

/// Quotes a value for postgresql.conf.
pub(crate) fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The settings block appended to a fresh cluster's postgresql.conf.
pub(crate) fn settings_block(
    archive_command: Option<&str>,
    durable: bool,
    extra: &[(String, String)],
) -> String {
    let mut s = String::from("\n# --- written by the pitr test bed\n");
    let mut set = |name: &str, value: &str| {
        let _ = writeln!(s, "{name} = {}", quote(value));
    };
    set("listen_addresses", "127.0.0.1");
    set("wal_level", "replica");
    set("archive_mode", "on");
    if let Some(cmd) = archive_command {
        set("archive_command", cmd);
    }
    set("max_wal_senders", "10");
    set("max_replication_slots", "10");
    set("fsync", if durable { "on" } else { "off" });
    set("shared_buffers", "64MB");
    set("max_connections", "40");
    set("log_line_prefix", "%m [%p] %q%a ");
    set("log_checkpoints", "on");
    for (name, value) in extra {
        set(name, value);
    }
    s
}

/// pg_hba.conf: the password roles first, each with its method, then trust for everyone
/// else on the socket and on 127.0.0.1, for both databases and replication.
pub(crate) fn hba() -> String {
    let mut s = String::from(
        "# written by the pitr test bed\nlocal all all trust\nlocal replication all trust\n",
    );
    for (role, method) in PASSWORD_ROLES {
        let _ = writeln!(s, "host all {role} 127.0.0.1/32 {method}");
        let _ = writeln!(s, "host replication {role} 127.0.0.1/32 {method}");
    }
    s.push_str("host all all 127.0.0.1/32 trust\n");
    s.push_str("host replication all 127.0.0.1/32 trust\n");
    s
}

/// SQL creating the password roles, each stored with the hash its method needs.
pub(crate) fn roles_sql() -> String {
    let mut s = String::new();
    for (role, method) in PASSWORD_ROLES {
        let encryption = if method == "md5" {
            "md5"
        } else {
            "scram-sha-256"
        };
        let _ = write!(
            s,
            "SET password_encryption = '{encryption}'; \
             CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{PASSWORD}'; \
             GRANT pg_monitor TO {role}; "
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_doubled() {
        assert_eq!(quote("cp %p '/x y/%f'"), "'cp %p ''/x y/%f'''");
    }

    #[test]
    fn password_roles_come_before_trust() {
        let hba = hba();
        let scram = hba.find("pitr_scram").unwrap();
        let trust = hba.find("host all all 127.0.0.1/32 trust").unwrap();
        assert!(scram < trust);
    }
}
