//! Delays between attempts: doubling from a floor to a ceiling, jittered.

use std::time::Duration;

/// Exponential backoff. Each delay is drawn from the upper half of its step
/// (`step/2 ..= step`), so backends that lost the same node do not all come
/// back at the same instant.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        Self {
            min,
            max,
            step: min,
        }
    }

    /// The next delay; the one after it is twice as long, up to the ceiling.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = step.saturating_mul(2).min(self.max);
        step / 2 + step.mul_f64(fastrand::f64() / 2.0)
    }

    /// Back to the floor (after a success).
    pub(crate) fn reset(&mut self) {
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
