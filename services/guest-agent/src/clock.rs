//! The guest's wall clock, put right from the host's. A VM restored from a snapshot wakes
//! with the clock it had when it was saved; the host's time reaches the agent in the serial
//! link's greeting ([`crate::serial`]) and in Reidentify ([`crate::identity`]), and both
//! step the clock here, by one rule.

use std::io;
use std::time::{Duration, SystemTime};

/// A guest clock this far from the host's is stepped to it.
pub const TOLERANCE: Duration = Duration::from_millis(100);

/// Guest minus host in nanoseconds, when that is more than [`TOLERANCE`] either way.
fn offset_beyond_tolerance(guest: SystemTime, host: SystemTime) -> Option<i64> {
    let (ahead, by) = match guest.duration_since(host) {
        Ok(by) => (true, by),
        Err(behind) => (false, behind.duration()),
    };
    if by <= TOLERANCE {
        return None;
    }
    let nanos = i64::try_from(by.as_nanos()).unwrap_or(i64::MAX);
    Some(if ahead { nanos } else { -nanos })
}

/// Steps the wall clock to `host` when the guest's is more than [`TOLERANCE`] off. Returns
/// how far off it was (guest minus host, in nanoseconds), 0 when within tolerance.
pub fn step_to(host: SystemTime) -> io::Result<i64> {
    let Some(offset) = offset_beyond_tolerance(SystemTime::now(), host) else {
        return Ok(0);
    };
    let since_epoch = host
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "before the Unix epoch"))?;
    let ts = libc::timespec {
        tv_sec: since_epoch.as_secs() as libc::time_t,
        tv_nsec: since_epoch.subsec_nanos() as libc::c_long,
    };
    // SAFETY: clock_settime reads the timespec it is given and nothing else.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    tracing::info!(
        offset_ms = offset / 1_000_000,
        "guest clock stepped to the host's"
    );
    Ok(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_offset_beyond_the_tolerance_counts_and_its_sign_is_guest_minus_host() {
        let host = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let at = |ms: i64| {
            if ms >= 0 {
                host + Duration::from_millis(ms as u64)
            } else {
                host - Duration::from_millis(ms.unsigned_abs())
            }
        };
        assert_eq!(offset_beyond_tolerance(at(0), host), None);
        assert_eq!(offset_beyond_tolerance(at(100), host), None);
        assert_eq!(offset_beyond_tolerance(at(-100), host), None);
        assert_eq!(offset_beyond_tolerance(at(101), host), Some(101_000_000));
        // A restored guest is behind: negative.
        assert_eq!(
            offset_beyond_tolerance(at(-60_000), host),
            Some(-60_000_000_000)
        );
    }
}
