//! Percentiles of latency samples, for the fault suite and the bench alike
//! (one definition, so their figures can be compared).

/// Nearest-rank percentile of an ascending slice (`p` in 0..=100): the
/// smallest sample that at least `p`% of the samples are at or below;
/// `None` if there are no samples.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    // The epsilon keeps float error (99.9 / 100 * 1000 = 999.0000000000001)
    // from pushing an exact rank up by one.
    let rank = (p * sorted.len() as f64 / 100.0 - 1e-9).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentile(&[], 50.0), None);
        let one = [7];
        assert_eq!(percentile(&one, 0.0), Some(7));
        assert_eq!(percentile(&one, 99.9), Some(7));
        let hundred: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&hundred, 0.0), Some(1));
        assert_eq!(percentile(&hundred, 50.0), Some(50));
        assert_eq!(percentile(&hundred, 99.0), Some(99));
        assert_eq!(percentile(&hundred, 99.9), Some(100));
        assert_eq!(percentile(&hundred, 100.0), Some(100));
        let thousand: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&thousand, 99.9), Some(999));
    }
}
