//! `$SYS` helpers: process memory and the moving averages mosquitto publishes as
//! `$SYS/broker/load/...`. No I/O beyond reading `/proc/self/statm`.

use std::time::Instant;

/// Resident set size of this process in bytes (0 where `/proc` is not available).
pub fn rss_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else { return 0 };
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// Exponentially weighted per-minute rates over 1, 5 and 15 minutes.
pub struct Load {
    last: Option<(Instant, u64, u64, u64)>,
    /// [received, sent, connections] x [1, 5, 15 min]
    avg: [[f64; 3]; 3],
}

impl Default for Load {
    fn default() -> Self {
        Load { last: None, avg: [[0.0; 3]; 3] }
    }
}

impl Load {
    /// Feeds the current totals; returns the `$SYS/broker/load/...` topics and values.
    pub fn update(&mut self, received: u64, sent: u64, connected: u64) -> Vec<(String, String)> {
        let now = Instant::now();
        if let Some((t, r0, s0, _)) = self.last {
            let dt = now.duration_since(t).as_secs_f64().max(1e-3);
            let rates = [
                received.saturating_sub(r0) as f64 * 60.0 / dt,
                sent.saturating_sub(s0) as f64 * 60.0 / dt,
                connected as f64,
            ];
            for (i, rate) in rates.iter().enumerate() {
                for (j, minutes) in [1.0, 5.0, 15.0].iter().enumerate() {
                    let alpha = 1.0 - (-dt / (60.0 * minutes)).exp();
                    self.avg[i][j] += alpha * (rate - self.avg[i][j]);
                }
            }
        }
        self.last = Some((now, received, sent, connected));
        let names = ["messages/received", "messages/sent", "connections"];
        let mut out = Vec::with_capacity(9);
        for (i, name) in names.iter().enumerate() {
            for (j, span) in ["1min", "5min", "15min"].iter().enumerate() {
                out.push((format!("$SYS/broker/load/{name}/{span}"), format!("{:.2}", self.avg[i][j])));
            }
        }
        out
    }
}
