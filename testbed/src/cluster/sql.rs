//! SQL and WAL helpers on a running [`Cluster`], through `psql` (no client library to keep
//! in step with every server version).

use std::process::Command;

use anyhow::{bail, Context, Result};

use super::{Cluster, SUPERUSER};

/// psql's field separator in [`Cluster::rows`] (unit separator: never in test data).
const FIELD_SEP: &str = "\x1f";

impl Cluster {
    /// Runs SQL as the superuser over the socket; returns psql's unaligned, tuples-only
    /// output, trimmed. Several statements may be given; the rows of each are printed.
    pub fn sql(&self, sql: &str) -> Result<String> {
        let mut psql = self.psql();
        psql.arg("-h")
            .arg(self.socket_dir())
            .args(["-U", SUPERUSER, "-d", "postgres", "-c", sql]);
        run_psql(psql, sql)
    }

    /// Creates tablespace `name` in a fresh directory the server owns (beside the data
    /// directory, removed with the cluster); returns where it is.
    pub fn create_tablespace(&self, name: &str) -> Result<std::path::PathBuf> {
        let dir = self.server_dir(name)?;
        self.sql(&format!(
            "CREATE TABLESPACE {name} LOCATION '{}'",
            dir.display()
        ))?;
        Ok(dir)
    }

    /// Runs `pgbench` with `args` against the `postgres` database as the superuser over the
    /// socket (`-i -s 3` to initialize, `-T 10` for load, ...); returns its output.
    pub fn pgbench(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(self.bin.client("pgbench"));
        for var in ["PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD"] {
            cmd.env_remove(var);
        }
        cmd.arg("-h")
            .arg(self.socket_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", SUPERUSER])
            .args(args)
            .arg("postgres");
        let out = cmd.output().context("run pgbench")?;
        if !out.status.success() {
            bail!(
                "pgbench {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// Rows of a query, each a list of column texts.
    pub fn rows(&self, sql: &str) -> Result<Vec<Vec<String>>> {
        let mut psql = self.psql();
        psql.arg("-h").arg(self.socket_dir()).args([
            "-F", FIELD_SEP, "-U", SUPERUSER, "-d", "postgres", "-c", sql,
        ]);
        let out = run_psql(psql, sql)?;
        Ok(out
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.split(FIELD_SEP).map(str::to_owned).collect())
            .collect())
    }

    /// Runs SQL as `role` over TCP on 127.0.0.1 with `password` (for authentication checks).
    pub fn sql_as(&self, role: &str, password: &str, sql: &str) -> Result<String> {
        let mut psql = self.psql();
        psql.args([
            "-h",
            "127.0.0.1",
            "-U",
            role,
            "-d",
            "postgres",
            "-w",
            "-c",
            sql,
        ])
        .env("PGPASSWORD", password);
        run_psql(psql, sql)
    }

    /// `pg_current_wal_lsn()` as text (`0/16B3D48`).
    pub fn current_lsn(&self) -> Result<String> {
        self.sql("SELECT pg_current_wal_lsn()")
    }

    /// The cluster's wal_segment_size in bytes.
    pub fn wal_segment_size(&self) -> Result<u64> {
        let text = self.sql("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'")?;
        let size: u64 = text.parse().context("wal_segment_size")?;
        // Reported in bytes since PostgreSQL 11.
        Ok(size)
    }

    /// Commits a transaction (so there is WAL to switch away from) and forces a WAL switch.
    /// Returns the name of the segment that was completed, the one the archiver gets next.
    pub fn switch_wal(&self) -> Result<String> {
        self.sql("SELECT txid_current()")?;
        self.sql("SELECT pg_walfile_name(pg_switch_wal())")
    }

    /// Writes real table data until `n` more segments are complete, then switches. Returns
    /// the completed segments' names, oldest first (the last may be short, ended by the switch).
    pub fn generate_wal_segments(&self, n: u64) -> Result<Vec<String>> {
        let seg_size = self.wal_segment_size()?;
        let start = parse_lsn(&self.current_lsn()?)?;
        let target = start + n * seg_size;
        self.sql(
            "CREATE TABLE IF NOT EXISTS pitr_bed_filler (id bigint, pad text); \
             ALTER TABLE pitr_bed_filler ALTER COLUMN pad SET STORAGE EXTERNAL",
        )?;
        // About 1 MiB of WAL per statement, with data that compresses like real rows.
        let rows_per_statement = 1000;
        while parse_lsn(&self.current_lsn()?)? < target {
            self.sql(&format!(
                "INSERT INTO pitr_bed_filler SELECT g, string_agg(md5(g::text || random()::text), '') \
                 FROM generate_series(1, {rows_per_statement}) g, generate_series(1, 30) r GROUP BY g"
            ))?;
        }
        let last = self.switch_wal()?;
        let first = self.sql(&format!("SELECT pg_walfile_name('{}')", format_lsn(start)))?;
        segment_range(&first, &last, seg_size)
    }
}

/// A psql command with the bed's defaults: no psqlrc, unaligned, tuples only, stop on error.
impl Cluster {
    fn psql(&self) -> Command {
        let mut cmd = Command::new(self.bin.client("psql"));
        for var in [
            "PGHOST",
            "PGPORT",
            "PGUSER",
            "PGDATABASE",
            "PGPASSWORD",
            "PGOPTIONS",
            "PGSERVICE",
        ] {
            cmd.env_remove(var);
        }
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-p"])
            .arg(self.port.to_string());
        cmd
    }
}

fn run_psql(mut psql: Command, sql: &str) -> Result<String> {
    let out = psql.output().context("run psql")?;
    if !out.status.success() {
        bail!(
            "psql failed for {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `16/B374D848` -> u64 (the bed's own small parser: it is an oracle for walfmt, not a user).
pub(crate) fn parse_lsn(text: &str) -> Result<u64> {
    let (hi, lo) = text
        .trim()
        .split_once('/')
        .with_context(|| format!("not an LSN: {text:?}"))?;
    let hi = u64::from_str_radix(hi, 16).with_context(|| format!("not an LSN: {text:?}"))?;
    let lo = u64::from_str_radix(lo, 16).with_context(|| format!("not an LSN: {text:?}"))?;
    Ok(hi << 32 | lo)
}

pub(crate) fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Every segment name from `first` to `last` inclusive, on `first`'s timeline.
fn segment_range(first: &str, last: &str, seg_size: u64) -> Result<Vec<String>> {
    let segs_per_id = 0x1_0000_0000 / seg_size;
    let parse = |name: &str| -> Result<(String, u64)> {
        if name.len() != 24 {
            bail!("not a segment name: {name:?}");
        }
        let hi = u64::from_str_radix(&name[8..16], 16)?;
        let lo = u64::from_str_radix(&name[16..24], 16)?;
        Ok((name[..8].to_owned(), hi * segs_per_id + lo))
    };
    let (tli, from) = parse(first)?;
    let (_, to) = parse(last)?;
    Ok((from..=to)
        .map(|n| format!("{tli}{:08X}{:08X}", n / segs_per_id, n % segs_per_id))
        .collect())
}

/// A word for `sh`, single-quoted.
fn sh_quote(path: &std::path::Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}

impl Cluster {
    /// Makes `dest` (which must not exist) a streaming standby of this running cluster, the
    /// way pg_basebackup would, without pg_basebackup (the machine's client tools are one
    /// major version; a pg_basebackup refuses servers newer than itself): PostgreSQL's
    /// low-level backup API in one psql session, the data directory copied meanwhile, its
    /// backup_label written, `standby.signal`, and `primary_conninfo` / `primary_slot_name`
    /// (a physical slot made first, holding the WAL the standby streams from its start).
    /// Adopt and start it with [`Cluster::adopt`].
    pub fn make_standby(&self, dest: &std::path::Path) -> Result<()> {
        if dest.exists() {
            bail!("{} exists", dest.display());
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let slot = format!("bed_standby_{nanos}");
        let label = self.root.path().join(format!("{slot}.label"));
        let (start, stop) = if self.bin.major() >= 15 {
            (
                "SELECT pg_backup_start('bed standby', true)",
                "SELECT labelfile FROM pg_backup_stop(false)",
            )
        } else {
            (
                "SELECT pg_start_backup('bed standby', true, false)",
                "SELECT labelfile FROM pg_stop_backup(false, false)",
            )
        };
        if std::fs::read_dir(self.data_dir.join("pg_tblspc"))?
            .next()
            .is_some()
        {
            bail!("make_standby does not copy tablespaces");
        }
        let (src, dst) = (sh_quote(&self.data_dir), sh_quote(dest));
        let done = dest.join(".bed-copied");
        // tar, not cp: files the running server removes meanwhile (recycled WAL, stats
        // temp files) are skipped, not fatal; the WAL comes from the primary by streaming.
        let copy = format!(
            "mkdir -p {dst} && (tar -C {src} --ignore-failed-read --warning=none \
             --exclude=./pg_wal/* --exclude=./pg_replslot/* --exclude=./pg_stat_tmp/* \
             --exclude=./postmaster.pid --exclude=./postmaster.opts -cf - . ; true) \
             | tar -C {dst} -xpf - && mkdir -p {dst}/pg_wal/archive_status && touch {}",
            sh_quote(&done)
        );
        let script = format!(
            "SELECT pg_create_physical_replication_slot('{slot}', true);\n{start};\n\\! {copy}\n\\o {}\n{stop};\n\\o\n",
            label.display()
        );
        // psql -c takes a backslash command only as the whole string: the script goes in
        // on stdin.
        let mut psql = self.psql();
        psql.arg("-h")
            .arg(self.socket_dir())
            .args(["-U", SUPERUSER, "-d", "postgres", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = psql.spawn().context("run psql")?;
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().context("psql's stdin")?;
            stdin.write_all(script.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        let copied = std::fs::remove_file(&done).is_ok();
        if !out.status.success() || !copied || !dest.join("PG_VERSION").is_file() {
            bail!(
                "the standby's base backup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = std::fs::read_to_string(&label).context("the backup label")?;
        if !text.contains("START WAL LOCATION") {
            bail!("pg_backup_stop returned no backup label: {text:?}");
        }
        std::fs::write(dest.join("backup_label"), format!("{}\n", text.trim_end()))?;
        std::fs::write(dest.join("standby.signal"), "")?;
        let mut auto = std::fs::OpenOptions::new()
            .append(true)
            .open(dest.join("postgresql.auto.conf"))?;
        {
            use std::io::Write;
            writeln!(
                auto,
                "primary_conninfo = '{}'\nprimary_slot_name = '{slot}'",
                self.conninfo()
            )?;
        }
        self.user.give_tree(dest)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_round_trip() {
        assert_eq!(parse_lsn("16/B374D848").unwrap(), 0x16_B374_D848);
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert!(parse_lsn("nope").is_err());
    }

    #[test]
    fn segment_range_crosses_log_ids() {
        let names = segment_range(
            "0000000100000000000000FE",
            "000000010000000100000000",
            16 << 20,
        )
        .unwrap();
        assert_eq!(
            names,
            [
                "0000000100000000000000FE",
                "0000000100000000000000FF",
                "000000010000000100000000"
            ]
        );
    }
}
