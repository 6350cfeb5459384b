//! Generated code for Capsa's gRPC contracts (`proto/capsa/<area>/v1`), one module per
//! package, plus the encoded descriptor set every server registers for reflection, and
//! [`limits`]: the contract's size and time limits every service and the CLI read.

#![allow(clippy::all, missing_docs)]

/// Encoded `FileDescriptorSet` of every Capsa proto, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("capsa_descriptor");

pub mod limits;

pub mod common {
    pub mod v1 {
        tonic::include_proto!("capsa.common.v1");
    }
}
pub mod session {
    pub mod v1 {
        tonic::include_proto!("capsa.session.v1");
    }
}
pub mod vmpool {
    pub mod v1 {
        tonic::include_proto!("capsa.vmpool.v1");
    }
}
pub mod executor {
    pub mod v1 {
        tonic::include_proto!("capsa.executor.v1");
    }
}
pub mod metering {
    pub mod v1 {
        tonic::include_proto!("capsa.metering.v1");
    }
}
pub mod agent {
    pub mod v1 {
        tonic::include_proto!("capsa.agent.v1");
    }
}

/// Conversions between `std::time` and the protobuf well-known types.
pub mod time {
    use std::time::{Duration, SystemTime};

    /// `Duration` to `google.protobuf.Duration` (saturating).
    pub fn duration(d: Duration) -> prost_types::Duration {
        prost_types::Duration {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: d.subsec_nanos() as i32,
        }
    }

    /// `google.protobuf.Duration` to `Duration`; `None` for negative or malformed values.
    pub fn from_duration(d: &prost_types::Duration) -> Option<Duration> {
        if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
            return None;
        }
        Some(Duration::new(d.seconds as u64, d.nanos as u32))
    }

    /// Milliseconds since the Unix epoch to `google.protobuf.Timestamp`.
    pub fn timestamp_ms(ms: i64) -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: ms.div_euclid(1000),
            nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
        }
    }

    /// `SystemTime` to `google.protobuf.Timestamp`.
    pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
        prost_types::Timestamp::from(t)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn durations_round_trip_and_reject_negative() {
            let d = Duration::from_millis(1500);
            assert_eq!(from_duration(&duration(d)), Some(d));
            assert_eq!(
                from_duration(&prost_types::Duration {
                    seconds: -1,
                    nanos: 0
                }),
                None
            );
        }

        #[test]
        fn timestamps_split_millis() {
            let t = timestamp_ms(1_700_000_000_123);
            assert_eq!((t.seconds, t.nanos), (1_700_000_000, 123_000_000));
        }
    }
}
