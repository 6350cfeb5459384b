//! How sessions, usage and files look: `key value` blocks and table rows for people, JSON
//! objects for scripts. Timestamps are RFC 3339 in UTC.

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use capsa_client::{
    EgressPolicy, FileInfo, FileType, ProcessInfo, ProcessState, SessionInfo as Session,
    SnapshotInfo as Snapshot, Usage,
};
use serde_json::{Value, json};

use crate::render::millis;

/// RFC 3339 in UTC to the second, e.g. `2026-11-28T13:45:00Z`; empty when unset. The
/// formatter covers years 1970 to 9999; a time outside them (never sent by a sane server)
/// shows as its raw seconds.
pub fn timestamp(t: &Option<prost_types::Timestamp>) -> String {
    const YEAR_10000: i64 = 253_402_300_800;
    let Some(t) = t else { return String::new() };
    if !(0..YEAR_10000).contains(&t.seconds) {
        return format!("{}s from the epoch", t.seconds);
    }
    let time = UNIX_EPOCH + Duration::from_secs(t.seconds.unsigned_abs());
    humantime::format_rfc3339_seconds(time).to_string()
}

/// A `google.protobuf.Duration` as `std`'s; `None` when unset or negative.
fn std_duration(d: &Option<prost_types::Duration>) -> Option<Duration> {
    d.as_ref()
        .and_then(capsa_client::proto::time::from_duration)
}

/// A duration for people, to the millisecond: `1h 30m`, `1s 500ms`.
pub fn duration(d: Duration) -> String {
    let ms = Duration::from_millis(d.as_millis().try_into().unwrap_or(u64::MAX));
    humantime::format_duration(ms).to_string()
}

fn name_of<T: AsRef<str>>(s: T, prefix: &str) -> String {
    s.as_ref().trim_start_matches(prefix).to_string()
}

pub fn session_json(s: &Session) -> Value {
    json!({
        "id": s.id,
        "status": name_of(s.status().as_str_name(), "SESSION_STATUS_"),
        "end_reason": name_of(s.end_reason().as_str_name(), "END_REASON_"),
        "end_message": s.end_message,
        "template": s.template,
        "vcpus": s.vcpus,
        "memory_mib": s.memory_mib,
        "env_names": s.env_names,
        "labels": s.metadata,
        "create_time": timestamp(&s.create_time),
        "expire_time": timestamp(&s.expire_time),
        "last_active_time": timestamp(&s.last_active_time),
        "end_time": timestamp(&s.end_time),
        "node_id": s.node_id,
        "vm_id": s.vm_id,
        "egress": s.egress.as_ref().map(egress_json),
        "auto_suspend": s.auto_suspend,
        "auto_resume": s.auto_resume,
        "suspend_time": timestamp(&s.suspend_time),
        "snapshot_bytes": s.snapshot_bytes,
        "source_snapshot_id": s.source_snapshot_id,
        "parent_session_id": s.parent_session_id,
    })
}

pub fn snapshot_status(s: &Snapshot) -> String {
    name_of(s.status().as_str_name(), "SNAPSHOT_STATUS_")
}

pub fn snapshot_json(s: &Snapshot) -> Value {
    json!({
        "id": s.id,
        "name": s.name,
        "status": snapshot_status(s),
        "session_id": s.session_id,
        "template": s.template,
        "vcpus": s.vcpus,
        "memory_mib": s.memory_mib,
        "size_bytes": s.size_bytes,
        "create_time": timestamp(&s.create_time),
        "node_id": s.node_id,
        "labels": s.metadata,
    })
}

/// `key value` lines for `capsa snapshot info`.
pub fn snapshot_text(s: &Snapshot) -> String {
    let v = snapshot_json(s);
    let mut out = String::new();
    for key in [
        "id",
        "name",
        "status",
        "session_id",
        "template",
        "vcpus",
        "memory_mib",
        "create_time",
        "node_id",
    ] {
        out += &format!("{:<17} {}\n", key, plain(&v[key]));
    }
    out += &format!("{:<17} {}\n", "size", bytes(s.size_bytes));
    let mut labels: Vec<_> = s.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    out += &format!("{:<17} {}\n", "labels", labels.join(" "));
    out
}

/// One table row for `capsa snapshot list`.
pub fn snapshot_row(s: &Snapshot) -> String {
    format!(
        "{:<37} {:<9} {:>10}  {:<20}  {:<38} {}",
        s.id,
        snapshot_status(s),
        bytes(s.size_bytes),
        timestamp(&s.create_time),
        s.session_id,
        s.name
    )
}

pub const SNAPSHOT_HEADER: &str = "ID                                    STATUS          SIZE  CREATED               SESSION                                NAME";

/// A policy with its defaults spelled out (`allow_http` unset means true).
pub fn egress_json(p: &EgressPolicy) -> Value {
    json!({
        "deny_all": p.deny_all,
        "allow_package_managers": p.allow_package_managers,
        "allow_http": p.allow_http.unwrap_or(true),
        "allow_https": p.allow_https.unwrap_or(true),
        "allowed_domains": p.allowed_domains,
        "allowed_cidrs": p.allowed_cidrs,
    })
}

/// `capsa egress`: one `key value` line per field.
pub fn egress_text(p: &EgressPolicy) -> String {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    [
        ("summary", egress_summary(p)),
        ("deny_all", yes_no(p.deny_all).into()),
        ("package_managers", yes_no(p.allow_package_managers).into()),
        ("http", yes_no(p.allow_http.unwrap_or(true)).into()),
        ("https", yes_no(p.allow_https.unwrap_or(true)).into()),
        ("domains", p.allowed_domains.join(" ")),
        ("cidrs", p.allowed_cidrs.join(" ")),
    ]
    .iter()
    .map(|(k, v)| format!("{k:<17} {v}\n"))
    .collect()
}

/// One line of what the policy admits, e.g. `package managers, pypi.org (no http)`.
pub fn egress_summary(p: &EgressPolicy) -> String {
    let mut admitted: Vec<&str> = Vec::new();
    if p.allow_package_managers {
        admitted.push("package managers");
    }
    admitted.extend(p.allowed_domains.iter().map(String::as_str));
    admitted.extend(p.allowed_cidrs.iter().map(String::as_str));
    if p.deny_all || admitted.is_empty() {
        return "none".into();
    }
    let mut out = admitted.join(", ");
    match (p.allow_http.unwrap_or(true), p.allow_https.unwrap_or(true)) {
        (true, true) => {}
        (false, true) => out += " (no http)",
        (true, false) => out += " (no https)",
        (false, false) => out += " (no http, no https)",
    }
    out
}

/// `key: value` lines for a human.
pub fn session_text(s: &Session) -> String {
    let v = session_json(s);
    let mut out = String::new();
    for key in [
        "id",
        "status",
        "template",
        "vcpus",
        "memory_mib",
        "create_time",
        "expire_time",
        "last_active_time",
        "node_id",
        "vm_id",
    ] {
        out += &format!("{key:<17} {}\n", plain(&v[key]));
    }
    if s.end_reason() != capsa_client::proto::session::v1::EndReason::Unspecified {
        out += &format!("{:<17} {}\n", "end_reason", plain(&v["end_reason"]));
        out += &format!("{:<17} {}\n", "end_time", plain(&v["end_time"]));
        if !s.end_message.is_empty() {
            out += &format!("{:<17} {}\n", "end_message", s.end_message);
        }
    }
    if s.status() == capsa_client::SessionStatus::Suspended {
        out += &format!("{:<17} {}\n", "suspend_time", plain(&v["suspend_time"]));
        out += &format!("{:<17} {}\n", "snapshot", bytes(s.snapshot_bytes));
    }
    if s.auto_suspend || s.auto_resume {
        let on: Vec<&str> = [
            ("auto_suspend", s.auto_suspend),
            ("auto_resume", s.auto_resume),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect();
        out += &format!("{:<17} {}\n", "options", on.join(" "));
    }
    out += &format!("{:<17} {}\n", "env", s.env_names.join(" "));
    let mut labels: Vec<_> = s.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    out += &format!("{:<17} {}\n", "labels", labels.join(" "));
    if let Some(p) = &s.egress {
        out += &format!("{:<17} {}\n", "egress", egress_summary(p));
    }
    out
}

/// One table row for `capsa list`.
pub fn session_row(s: &Session) -> String {
    let mut labels: Vec<_> = s.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    format!(
        "{:<38} {:<12} {:<10} {:>5} {:>7}  {:<20}  {:<20}  {}",
        s.id,
        name_of(s.status().as_str_name(), "SESSION_STATUS_"),
        s.template,
        s.vcpus,
        s.memory_mib,
        timestamp(&s.create_time),
        timestamp(&s.expire_time),
        labels.join(",")
    )
}

pub const SESSION_HEADER: &str = "ID                                     STATUS       TEMPLATE   VCPUS  MEM_MIB  CREATED               EXPIRES               LABELS";

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn usage_json(u: &Usage) -> Value {
    json!({
        "cpu_time_ms": millis(std_duration(&u.cpu_time)),
        "memory_used_bytes": u.memory_used_bytes,
        "memory_peak_bytes": u.memory_peak_bytes,
        "vmm_resident_bytes": u.vmm_resident_bytes,
        "vmm_resident_peak_bytes": u.vmm_resident_peak_bytes,
        "network_rx_bytes": u.network_rx_bytes,
        "network_tx_bytes": u.network_tx_bytes,
        "disk_read_bytes": u.disk_read_bytes,
        "disk_write_bytes": u.disk_write_bytes,
        "uptime_ms": millis(std_duration(&u.uptime)),
        "processes_running": u.processes_running,
        "terminals_open": u.terminals_open,
        "sample_time": timestamp(&u.sample_time),
    })
}

/// `12.3 MiB`.
pub fn bytes(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

pub fn usage_text(u: &Usage) -> String {
    let d = |d: &Option<prost_types::Duration>| std_duration(d).map_or("-".into(), duration);
    let mib = bytes;
    [
        ("cpu_time", d(&u.cpu_time)),
        ("memory_used", mib(u.memory_used_bytes)),
        ("memory_peak", mib(u.memory_peak_bytes)),
        ("vmm_resident", mib(u.vmm_resident_bytes)),
        ("vmm_resident_peak", mib(u.vmm_resident_peak_bytes)),
        ("network_rx", format!("{} B", u.network_rx_bytes)),
        ("network_tx", format!("{} B", u.network_tx_bytes)),
        ("disk_read", format!("{} B", u.disk_read_bytes)),
        ("disk_write", format!("{} B", u.disk_write_bytes)),
        ("uptime", d(&u.uptime)),
        ("processes", u.processes_running.to_string()),
        ("terminals", u.terminals_open.to_string()),
        ("sampled_at", timestamp(&u.sample_time)),
    ]
    .iter()
    .map(|(k, v)| format!("{k:<17} {v}\n"))
    .collect()
}

pub fn file_json(f: &FileInfo) -> Value {
    json!({
        "path": f.path,
        "name": f.name,
        "type": name_of(f.r#type().as_str_name(), "FILE_TYPE_").to_lowercase(),
        "size": f.size,
        "mode": format!("{:o}", f.mode),
        "modify_time": timestamp(&f.modify_time),
    })
}

/// `capsa stat`: one `key value` line per field.
pub fn file_text(f: &FileInfo) -> String {
    let v = file_json(f);
    ["path", "type", "size", "mode", "modify_time"]
        .iter()
        .map(|k| format!("{k:<12} {}\n", plain(&v[*k])))
        .collect()
}

/// An `ls -l`-like line.
pub fn file_row(f: &FileInfo) -> String {
    let kind = match f.r#type() {
        FileType::Directory => 'd',
        FileType::Symlink => 'l',
        FileType::Regular => '-',
        _ => '?',
    };
    let suffix = if f.r#type() == FileType::Directory {
        "/"
    } else {
        ""
    };
    format!(
        "{kind}{:04o} {:>12}  {:<20}  {}{suffix}",
        f.mode,
        f.size,
        timestamp(&f.modify_time),
        f.name
    )
}

pub fn process_json(p: &ProcessInfo) -> Value {
    let exited = p.state() == ProcessState::Exited;
    json!({
        "id": p.process_id,
        "kind": name_of(p.kind().as_str_name(), "PROCESS_KIND_"),
        "pid": p.pid,
        "command": p.command,
        "args": p.args,
        "state": name_of(p.state().as_str_name(), "PROCESS_STATE_"),
        "exit_code": exited.then_some(p.exit_code),
        "signal": (p.signal != 0).then_some(p.signal),
        "start_time": timestamp(&p.start_time),
        "end_time": timestamp(&p.end_time),
        "output_offset": p.output_offset,
        "stdin_open": p.stdin_open,
    })
}

pub const PROCESS_HEADER: &str =
    "ID       KIND        PID      STATE    EXIT   STARTED               COMMAND";

/// One table row for `capsa process list`: the exit status as a shell shows it (`-` while
/// running, `SIGTERM`-style after a signal), the command line last.
pub fn process_row(p: &ProcessInfo) -> String {
    let exit = match (p.state(), p.signal) {
        (ProcessState::Exited, 0) => p.exit_code.to_string(),
        (ProcessState::Exited, signal) => format!("sig{signal}"),
        _ => "-".into(),
    };
    let command = std::iter::once(&p.command)
        .chain(&p.args)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "{:<8} {:<11} {:<8} {:<8} {:<6} {:<20}  {command}",
        p.process_id,
        name_of(p.kind().as_str_name(), "PROCESS_KIND_"),
        p.pid,
        name_of(p.state().as_str_name(), "PROCESS_STATE_"),
        exit,
        timestamp(&p.start_time),
    )
}

/// A note for humans on stderr, e.g. after an upload.
pub fn bytes_note(path: &Path, size: u64, sha256: &str, elapsed: Duration) -> String {
    format!(
        "{} ({size} bytes, sha256 {sha256}) in {}",
        path.display(),
        duration(elapsed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        });
        assert_eq!(timestamp(&t), "2023-11-14T22:13:20Z");
        let leap = Some(prost_types::Timestamp {
            seconds: 951_782_400,
            nanos: 0,
        });
        assert_eq!(timestamp(&leap), "2000-02-29T00:00:00Z");
        assert_eq!(timestamp(&None), "");
        let early = Some(prost_types::Timestamp {
            seconds: -86_400,
            nanos: 0,
        });
        assert_eq!(timestamp(&early), "-86400s from the epoch");
    }

    #[test]
    fn durations_are_humantime_to_the_millisecond() {
        assert_eq!(duration(Duration::from_secs(5400)), "1h 30m");
        assert_eq!(duration(Duration::from_micros(1_500_700)), "1s 500ms");
        assert_eq!(duration(Duration::ZERO), "0s");
    }

    #[test]
    fn sessions_render_for_people_and_scripts() {
        let s = Session {
            id: "s-1".into(),
            status: capsa_client::SessionStatus::Active as i32,
            metadata: [("team".to_string(), "ml".to_string())].into(),
            ..Default::default()
        };
        let v = session_json(&s);
        assert_eq!(
            (v["status"].as_str(), v["labels"]["team"].as_str()),
            (Some("ACTIVE"), Some("ml"))
        );
        assert!(session_text(&s).contains("status            ACTIVE\n"));
        assert!(session_row(&s).starts_with("s-1 "));
        let f = FileInfo {
            name: "d".into(),
            r#type: FileType::Directory as i32,
            mode: 0o755,
            ..Default::default()
        };
        assert!(file_row(&f).starts_with("d0755"), "{}", file_row(&f));
        assert!(file_row(&f).ends_with("d/"));
        assert_eq!(file_json(&f)["type"], "directory");
        let text = file_text(&f);
        assert!(text.contains("type         directory\n"), "{text}");
        assert!(text.contains("mode         755\n"), "{text}");
    }

    #[test]
    fn egress_policies_render_with_their_defaults_spelled_out() {
        let p = EgressPolicy {
            allow_package_managers: true,
            allow_http: Some(false),
            allowed_domains: vec!["pypi.org".into(), "*.example.com".into()],
            allowed_cidrs: vec!["198.51.100.0/24".into()],
            ..Default::default()
        };
        assert_eq!(
            egress_summary(&p),
            "package managers, pypi.org, *.example.com, 198.51.100.0/24 (no http)"
        );
        let text = egress_text(&p);
        assert!(text.contains("http              no\n"), "{text}");
        assert!(text.contains("https             yes\n"), "{text}");
        assert!(
            text.contains("domains           pypi.org *.example.com\n"),
            "{text}"
        );
        let v = egress_json(&p);
        assert_eq!(
            (v["allow_http"].as_bool(), v["allow_https"].as_bool()),
            (Some(false), Some(true))
        );
        let none = EgressPolicy {
            deny_all: true,
            allowed_domains: vec!["pypi.org".into()],
            ..Default::default()
        };
        assert_eq!(egress_summary(&none), "none");
        assert_eq!(egress_summary(&EgressPolicy::default()), "none");
        let s = Session {
            egress: Some(p),
            ..Default::default()
        };
        assert!(session_text(&s).contains("egress            package managers, pypi.org"));
        assert_eq!(
            session_json(&s)["egress"]["allowed_cidrs"][0],
            "198.51.100.0/24"
        );
    }
}
