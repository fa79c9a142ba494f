//! Progress of a batch shard: a progress bar on a terminal, a log line (rows, rows/s, ETA)
//! every few seconds otherwise, and the final summary.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tracing::info;

/// How often the log reports when there is no terminal.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Tracks rows done against the shard's total.
pub struct Progress {
    total: u64,
    done: u64,
    started: Instant,
    last_log: Instant,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Starts tracking `total` rows.
    pub fn new(total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            if let Ok(style) =
                ProgressStyle::with_template("{bar:40} {pos}/{len} rows  {per_sec}  ETA {eta}")
            {
                bar.set_style(style);
            }
            bar
        });
        let now = Instant::now();
        Self {
            total,
            done: 0,
            started: now,
            last_log: now,
            bar,
        }
    }

    /// `rows` more rows are done.
    pub fn advance(&mut self, rows: u64) {
        self.done += rows;
        match &self.bar {
            Some(bar) => bar.set_position(self.done),
            None if self.last_log.elapsed() >= LOG_EVERY => {
                self.last_log = Instant::now();
                let rate = self.rate();
                let eta = eta(self.total.saturating_sub(self.done), rate);
                info!(
                    rows = self.done,
                    total = self.total,
                    rows_per_second = rate.round(),
                    eta_seconds = eta.as_secs(),
                    "progress"
                );
            }
            None => {}
        }
    }

    /// Rows per second so far.
    pub fn rate(&self) -> f64 {
        let seconds = self.started.elapsed().as_secs_f64();
        if seconds > 0.0 {
            self.done as f64 / seconds
        } else {
            0.0
        }
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Time left for `remaining` rows at `rate` rows/s.
pub fn eta(remaining: u64, rate: f64) -> Duration {
    if rate > 0.0 {
        Duration::from_secs_f64(remaining as f64 / rate)
    } else {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_is_remaining_over_rate() {
        assert_eq!(eta(1_000, 100.0), Duration::from_secs(10));
        assert_eq!(eta(1_000, 0.0), Duration::ZERO);
    }
}
