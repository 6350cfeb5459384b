//! GetStats: memory from /proc/meminfo, process count from /proc, uptime from
//! /proc/uptime and the kernel release from uname(2).

use crate::error::Error;

#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub memory_total_bytes: u64,
    /// MemTotal - MemAvailable.
    pub memory_used_bytes: u64,
    pub process_count: u32,
    pub uptime_ms: u64,
    pub kernel_release: String,
}

pub fn read() -> Result<Stats, Error> {
    let io = |what: &'static str| {
        move |e| Error::Io {
            op: "read",
            path: what.into(),
            source: e,
        }
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(io("/proc/meminfo"))?;
    let (total, available) = parse_meminfo(&meminfo).ok_or_else(|| Error::Io {
        op: "parse",
        path: "/proc/meminfo".into(),
        source: std::io::Error::other("no MemTotal/MemAvailable"),
    })?;
    let uptime = std::fs::read_to_string("/proc/uptime").map_err(io("/proc/uptime"))?;
    let process_count = std::fs::read_dir("/proc")
        .map_err(io("/proc"))?
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .count();
    let uname = nix::sys::utsname::uname().map_err(|e| Error::Io {
        op: "call",
        path: "uname".into(),
        source: e.into(),
    })?;
    Ok(Stats {
        memory_total_bytes: total,
        memory_used_bytes: total.saturating_sub(available),
        process_count: process_count as u32,
        uptime_ms: parse_uptime_ms(&uptime).unwrap_or(0),
        kernel_release: uname.release().to_string_lossy().into_owned(),
    })
}

/// (MemTotal, MemAvailable) in bytes.
fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    Some((field("MemTotal")?, field("MemAvailable")?))
}

fn parse_uptime_ms(text: &str) -> Option<u64> {
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some((secs * 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_and_uptime_parse() {
        let m = "MemTotal:        2048 kB\nMemFree:  10 kB\nMemAvailable:    1024 kB\n";
        assert_eq!(parse_meminfo(m), Some((2048 * 1024, 1024 * 1024)));
        assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
        assert_eq!(parse_uptime_ms("12.34 56.78\n"), Some(12_340));
    }

    #[test]
    fn this_machine_has_stats() {
        let s = read().unwrap();
        assert!(s.memory_total_bytes > 0 && s.memory_used_bytes <= s.memory_total_bytes);
        assert!(s.process_count > 0);
        assert!(!s.kernel_release.is_empty());
    }
}
