//! Small pure helpers of the bench: distinct seeded draws, the cheap push-frame scanner, percentiles.

use entity_sync_testkit::stats::percentile;

/// `count` distinct values of `0..n` drawn from `rng`, in draw order.
/// `count <= n`. The bench seeds its generator (`--seed`), so a run and its
/// ceiling run pick the same keys.
pub fn distinct(rng: &mut fastrand::Rng, count: usize, n: u32) -> Vec<u32> {
    assert!(
        count as u64 <= u64::from(n),
        "cannot draw {count} distinct values of {n}"
    );
    let mut out: Vec<u32> = Vec::with_capacity(count);
    while out.len() < count {
        let v = rng.u32(..n);
        if !out.contains(&v) {
            out.push(v);
        }
    }
    out
}

/// What the bench needs of a push frame: the key's id and the `"v"` of its first row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushInfo<'a> {
    pub id: &'a str,
    /// `None` when the push carries no row with a `"v"` (e.g. `"rows":[]`).
    pub v: Option<u64>,
}

/// Scans `{"action":"push","body":{"entity":..,"id":"17",..,"rows":[{"id":"17","v":123,..}]}}`
/// for the id and the row's `"v"` without parsing the JSON: the generator
/// shares the cores with the node, so it must stay light. Returns `None` for
/// any other frame (subscribed, error, ...).
pub fn scan_push(frame: &str) -> Option<PushInfo<'_>> {
    const PUSH: &str = r#"{"action":"push","#;
    if !frame.starts_with(PUSH) {
        return None;
    }
    let rest = &frame[PUSH.len()..];
    let id_at = rest.find(r#""id":""#)? + 6;
    let id_len = rest[id_at..].find('"')?;
    let id = &rest[id_at..id_at + id_len];
    let after_id = &rest[id_at + id_len..];
    let v = after_id.find(r#""rows":["#).and_then(|rows_at| {
        let rows = &after_id[rows_at..];
        let v_at = rows.find(r#""v":"#)? + 4;
        parse_leading_u64(&rows[v_at..])
    });
    Some(PushInfo { id, v })
}

/// The envelope's `"version"` of a push frame (the bus version it reflects),
/// read before its rows so a row's own field is never taken for it.
pub fn push_version(frame: &str) -> Option<u64> {
    let head = &frame[..frame.find(r#""rows":["#).unwrap_or(frame.len())];
    let at = head.find(r#""version":"#)? + 10;
    parse_leading_u64(&head[at..])
}

/// A `subscribed` frame's id, and whether it says `"current":true` (the
/// client's version is still the key's latest: no snapshot follows).
pub fn scan_subscribed(frame: &str) -> Option<(&str, bool)> {
    let rest = frame.strip_prefix(r#"{"action":"subscribed","#)?;
    let id_at = rest.find(r#""id":""#)? + 6;
    let id_len = rest[id_at..].find('"')?;
    Some((
        &rest[id_at..id_at + id_len],
        rest.contains(r#""current":true"#),
    ))
}

fn parse_leading_u64(s: &str) -> Option<u64> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    s[..digits].parse().ok()
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub samples: usize,
}

/// Sorts `samples` and takes p50/p99/p99.9/max; `None` if there are none.
pub fn percentiles(samples: &mut [u64]) -> Option<Percentiles> {
    samples.sort_unstable();
    Some(Percentiles {
        p50: percentile(samples, 50.0)?,
        p99: percentile(samples, 99.0)?,
        p999: percentile(samples, 99.9)?,
        max: *samples.last()?,
        samples: samples.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_draws_are_distinct_and_in_range() {
        let mut r = fastrand::Rng::with_seed(1);
        for _ in 0..100 {
            let mut d = distinct(&mut r, 5, 1000);
            assert!(d.iter().all(|&v| v < 1000));
            d.sort_unstable();
            d.dedup();
            assert_eq!(d.len(), 5);
        }
        let mut all = distinct(&mut r, 4, 4);
        all.sort_unstable();
        assert_eq!(all, [0, 1, 2, 3]);
        // The same seed, the same draws.
        let (mut a, mut b) = (fastrand::Rng::with_seed(42), fastrand::Rng::with_seed(42));
        assert_eq!(distinct(&mut a, 50, 1000), distinct(&mut b, 50, 1000));
    }

    #[test]
    fn scans_a_push_frame() {
        let frame = r#"{"action":"push","body":{"entity":"bench","id":"17","version":42,"rows":[{"id":"17","v":123,"pad":"xx"}]}}"#;
        assert_eq!(
            scan_push(frame),
            Some(PushInfo {
                id: "17",
                v: Some(123)
            })
        );
        // The envelope's "version" must not be mistaken for the row's "v".
        let frame = r#"{"action":"push","body":{"entity":"bench","id":"3","version":9,"rows":[{"id":"3","v":0,"pad":""}]}}"#;
        assert_eq!(scan_push(frame).unwrap().v, Some(0));
        let empty = r#"{"action":"push","body":{"entity":"bench","id":"3","version":9,"rows":[]}}"#;
        assert_eq!(scan_push(empty), Some(PushInfo { id: "3", v: None }));
    }

    #[test]
    fn reads_the_envelope_version_and_subscribed_answers() {
        let frame = r#"{"action":"push","body":{"entity":"bench","id":"3","version":9,"rows":[{"id":"3","v":0,"version":77}]}}"#;
        assert_eq!(push_version(frame), Some(9));
        let none =
            r#"{"action":"push","body":{"entity":"bench","id":"3","rows":[{"version":77}]}}"#;
        assert_eq!(push_version(none), None);
        assert_eq!(
            scan_subscribed(r#"{"action":"subscribed","body":{"entity":"bench","id":"100"}}"#),
            Some(("100", false))
        );
        assert_eq!(
            scan_subscribed(
                r#"{"action":"subscribed","body":{"entity":"items","id":"100","current":true}}"#
            ),
            Some(("100", true))
        );
        assert_eq!(
            scan_subscribed(r#"{"action":"push","body":{"id":"1"}}"#),
            None
        );
    }

    #[test]
    fn ignores_other_frames() {
        assert_eq!(
            scan_push(r#"{"action":"subscribed","body":{"entity":"bench","id":"1"}}"#),
            None
        );
        assert_eq!(
            scan_push(r#"{"action":"error","body":{"code":"forbidden","message":"no"}}"#),
            None
        );
        assert_eq!(scan_push("not json"), None);
        assert_eq!(scan_push(r#"{"action":"push","body":{}}"#), None);
    }

    #[test]
    fn percentiles_of_unsorted_samples() {
        let mut shuffled = vec![5, 1, 4, 2, 3];
        let p = percentiles(&mut shuffled).unwrap();
        assert_eq!((p.p50, p.p99, p.p999, p.max, p.samples), (3, 5, 5, 5, 5));
        assert_eq!(percentiles(&mut []), None);
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }
}
