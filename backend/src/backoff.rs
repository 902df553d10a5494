//! Delays between attempts: doubling from a floor to a ceiling, jittered.

use std::time::Duration;

/// Exponential backoff with jitter, for retry loops.
///
/// The step starts at the floor and doubles after every delay handed out, up
/// to the ceiling; [`reset`](Self::reset) puts it back to the floor after a
/// success. Each delay is drawn from the upper half of its step
/// (`step/2 ..= step`), so clients that lost the same peer at the same moment
/// do not all come back at the same instant.
///
/// ```
/// use std::time::Duration;
/// use entity_sync_backend::Backoff;
///
/// let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
/// let first = backoff.next_delay();
/// assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
/// let second = backoff.next_delay();
/// assert!(second >= Duration::from_millis(100) && second <= Duration::from_millis(200));
/// backoff.reset();
/// assert!(backoff.next_delay() <= Duration::from_millis(100));
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    /// A backoff whose steps double from `min` up to `max` (a `max` below
    /// `min` is taken as `min`: a constant step).
    #[must_use]
    pub fn new(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        Self {
            min,
            max,
            step: min,
        }
    }

    /// The next delay; the one after it is twice as long, up to the ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = step.saturating_mul(2).min(self.max);
        step / 2 + step.mul_f64(fastrand::f64() / 2.0)
    }

    /// Back to the floor (after a success).
    pub fn reset(&mut self) {
        self.step = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_ceiling_with_jitter_and_resets() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(700));
        let mut backoff = Backoff::new(min, max);
        let steps = [100, 200, 400, 700, 700];
        for step in steps {
            let step = Duration::from_millis(step);
            let delay = backoff.next_delay();
            assert!(
                delay >= step / 2 && delay <= step,
                "{delay:?} for step {step:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= min);
    }
}
