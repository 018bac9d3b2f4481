//! Growth rates over a sliding window, and when the disk fills at that rate.
//!
//! A least-squares line through the window's samples rather than the
//! difference of its ends: a node writes in bursts (a block, a LevelDB
//! compaction that frees as much as it writes), and the line is what those
//! bursts add up to.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Samples kept per series; with a long window they are spaced out to fit.
pub const MAX_SAMPLES: usize = 256;
/// Fewer samples than this give no rate.
const MIN_SAMPLES: usize = 3;

#[derive(Debug, Clone)]
pub struct Trend {
    window: Duration,
    samples: VecDeque<(Instant, f64)>,
}

impl Trend {
    pub fn new(window: Duration) -> Trend {
        Trend { window, samples: VecDeque::new() }
    }

    pub fn push(&mut self, at: Instant, value: f64) {
        while let Some(&(t, _)) = self.samples.front() {
            if at.duration_since(t) > self.window {
                self.samples.pop_front();
            } else {
                break;
            }
        }
        let spacing = self.window / MAX_SAMPLES as u32;
        if let Some(&(last, _)) = self.samples.back() {
            if at.duration_since(last) < spacing {
                return;
            }
        }
        if self.samples.len() == MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back((at, value));
    }

    /// Units per second over the window; None with too few samples.
    pub fn slope(&self) -> Option<f64> {
        if self.samples.len() < MIN_SAMPLES {
            return None;
        }
        let t0 = self.samples[0].0;
        let xs: Vec<f64> = self.samples.iter().map(|(t, _)| t.duration_since(t0).as_secs_f64()).collect();
        let n = xs.len() as f64;
        let mean_x = xs.iter().sum::<f64>() / n;
        let mean_y = self.samples.iter().map(|(_, y)| y).sum::<f64>() / n;
        let (mut sxy, mut sxx) = (0.0, 0.0);
        for (x, (_, y)) in xs.iter().zip(&self.samples) {
            sxy += (x - mean_x) * (y - mean_y);
            sxx += (x - mean_x) * (x - mean_x);
        }
        (sxx > 0.0).then(|| sxy / sxx)
    }
}

/// Days until `available` bytes are used up at `fill_rate` bytes per
/// second; None when the filesystem is not filling.
pub fn days_until_full(available: u64, fill_rate: Option<f64>) -> Option<f64> {
    let rate = fill_rate.filter(|r| *r > 0.0 && r.is_finite())?;
    Some(available as f64 / rate / 86400.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_growth_gives_its_rate() {
        let start = Instant::now();
        let mut t = Trend::new(Duration::from_secs(60));
        for i in 0..30u64 {
            // 1000 B/s with noise that cancels out
            let noise = if i % 2 == 0 { 300.0 } else { -300.0 };
            t.push(start + Duration::from_secs(i), 1e6 + 1000.0 * i as f64 + noise);
        }
        let s = t.slope().unwrap();
        assert!((s - 1000.0).abs() < 50.0, "{s}");
    }

    #[test]
    fn flat_and_short_series() {
        let start = Instant::now();
        let mut t = Trend::new(Duration::from_secs(10));
        t.push(start, 5.0);
        t.push(start + Duration::from_secs(1), 5.0);
        assert_eq!(t.slope(), None);
        t.push(start + Duration::from_secs(2), 5.0);
        assert_eq!(t.slope(), Some(0.0));
        assert_eq!(days_until_full(100, t.slope()), None);
    }

    #[test]
    fn window_slides_and_stays_bounded() {
        let start = Instant::now();
        let mut t = Trend::new(Duration::from_secs(10));
        // a falling past outside the window must not count
        for i in 0..20u64 {
            t.push(start + Duration::from_secs(i), -(i as f64) * 100.0);
        }
        for i in 20..40u64 {
            t.push(start + Duration::from_secs(i), 7.0 * i as f64);
        }
        assert!((t.slope().unwrap() - 7.0).abs() < 1e-9);
        let mut many = Trend::new(Duration::from_secs(3600));
        for i in 0..10_000u64 {
            many.push(start + Duration::from_millis(i * 100), i as f64);
        }
        assert!(many.samples.len() <= MAX_SAMPLES);
    }

    #[test]
    fn forecast() {
        // 86400 B free at 1 B/s: one day
        assert_eq!(days_until_full(86400, Some(1.0)), Some(1.0));
        assert_eq!(days_until_full(86400, Some(-1.0)), None);
        assert_eq!(days_until_full(0, Some(1.0)), Some(0.0));
    }
}
