//! The compact traffic record every scorer pod publishes to Redis once per window, so the
//! autoscaler reads hits and misses without a Prometheus server.
//!
//! One hash per model version ([`crate::keys::Keyspace::traffic`]), one field per pod, the
//! value a fixed 29-byte record: `[1][end ms u64][window ms u32][hits u64][misses u64]`, all
//! little-endian. A reader judges freshness by `end_ms`: a record older than a couple of
//! windows belongs to a pod that stopped reporting and must not be read as zero traffic.

use std::time::Duration;

/// The version byte that starts every encoded window.
pub const TRAFFIC_ENCODING_V1: u8 = 1;

/// Length of a v1 record.
pub const TRAFFIC_V1_LEN: usize = 1 + 8 + 4 + 8 + 8;

/// One pod's counts over one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrafficWindow {
    /// When the window closed, in milliseconds since the Unix epoch.
    pub end_ms: u64,
    /// How long the window was.
    pub window_ms: u32,
    /// Requests answered from a cache tier (memory, a batch prediction, a cached real-time one).
    pub hits: u64,
    /// Requests that needed a real-time computation (whether or not it succeeded).
    pub misses: u64,
}

/// A stored record this code cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrafficDecodeError {
    /// Not a v1 record.
    #[error(
        "traffic record of {len} bytes with encoding {version:?}; expected {TRAFFIC_V1_LEN} bytes of encoding 1"
    )]
    Unreadable {
        /// The bytes found.
        len: usize,
        /// The first byte, if any.
        version: Option<u8>,
    },
}

impl TrafficWindow {
    /// The compact form.
    pub fn encode(&self) -> [u8; TRAFFIC_V1_LEN] {
        let mut out = [0u8; TRAFFIC_V1_LEN];
        out[0] = TRAFFIC_ENCODING_V1;
        out[1..9].copy_from_slice(&self.end_ms.to_le_bytes());
        out[9..13].copy_from_slice(&self.window_ms.to_le_bytes());
        out[13..21].copy_from_slice(&self.hits.to_le_bytes());
        out[21..29].copy_from_slice(&self.misses.to_le_bytes());
        out
    }

    /// Reads a record written by [`TrafficWindow::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, TrafficDecodeError> {
        if bytes.len() != TRAFFIC_V1_LEN || bytes[0] != TRAFFIC_ENCODING_V1 {
            return Err(TrafficDecodeError::Unreadable {
                len: bytes.len(),
                version: bytes.first().copied(),
            });
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let mut window = [0u8; 4];
        window.copy_from_slice(&bytes[9..13]);
        Ok(Self {
            end_ms: u64_at(1),
            window_ms: u32::from_le_bytes(window),
            hits: u64_at(13),
            misses: u64_at(21),
        })
    }

    /// Misses per second over the window (zero for an empty window).
    pub fn misses_per_second(&self) -> f64 {
        per_second(self.misses, self.window_ms)
    }

    /// Requests per second over the window.
    pub fn requests_per_second(&self) -> f64 {
        per_second(self.hits + self.misses, self.window_ms)
    }

    /// Whether the record is older than `max_age` at `now_ms`.
    pub fn is_stale(&self, now_ms: u64, max_age: Duration) -> bool {
        now_ms.saturating_sub(self.end_ms) > max_age.as_millis() as u64
    }
}

fn per_second(count: u64, window_ms: u32) -> f64 {
    if window_ms == 0 {
        0.0
    } else {
        count as f64 * 1000.0 / f64::from(window_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_round_trip_and_give_rates() {
        let w = TrafficWindow {
            end_ms: 1_764_468_000_123,
            window_ms: 5_000,
            hits: 9_000,
            misses: 1_000,
        };
        let bytes = w.encode();
        assert_eq!(bytes.len(), 29);
        assert_eq!(TrafficWindow::decode(&bytes), Ok(w));
        assert_eq!(w.misses_per_second(), 200.0);
        assert_eq!(w.requests_per_second(), 2_000.0);
        assert!(!w.is_stale(w.end_ms + 10_000, Duration::from_secs(10)));
        assert!(w.is_stale(w.end_ms + 10_001, Duration::from_secs(10)));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(TrafficWindow::decode(&[]).is_err());
        let mut bytes = TrafficWindow {
            end_ms: 1,
            window_ms: 1,
            hits: 1,
            misses: 1,
        }
        .encode();
        bytes[0] = 2;
        assert_eq!(
            TrafficWindow::decode(&bytes),
            Err(TrafficDecodeError::Unreadable {
                len: 29,
                version: Some(2)
            })
        );
        assert_eq!(
            TrafficWindow {
                end_ms: 0,
                window_ms: 0,
                hits: 3,
                misses: 3
            }
            .misses_per_second(),
            0.0
        );
    }
}
