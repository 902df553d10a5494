//! What a `Register` may ask for, checked before the pool is touched.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use super::{effects::ResolverId, error::RegisterError};
use crate::{
    key::validate_part,
    proto::v1::{FetchMode, Register},
};

/// Messages beyond `max_in_flight` a stream's channel can hold (pass-through).
pub(crate) const PASS_THROUGH_HEADROOM: usize = 256;
/// Upper bound on a resolver's `max_in_flight`.
pub(crate) const MAX_IN_FLIGHT_CAP: u32 = 4096;
/// Most entities one `Register` may name.
pub(crate) const MAX_ENTITIES_PER_STREAM: usize = 1024;
/// Longest `Register.name`, in bytes.
const MAX_NAME_BYTES: usize = 128;
/// Shortest non-zero `EntityRegistration.refresh_interval_ms`.
pub(crate) const MIN_REFRESH_INTERVAL_MS: u32 = 1_000;
/// Longest `EntityRegistration.refresh_interval_ms` (24 hours).
pub(crate) const MAX_REFRESH_INTERVAL_MS: u32 = 86_400_000;

/// A `Register` that passed its checks.
pub(super) struct Checked {
    /// `Register.name`, trimmed.
    pub(super) name: Arc<str>,
    /// The entities named, in order, with their fetch modes.
    pub(super) entities: Vec<(Arc<str>, FetchMode)>,
    /// The entities named with a refresh interval, and that interval (ms).
    pub(super) refresh: Vec<(Arc<str>, u32)>,
}

/// Checks what `register` asks for on its own (the pool's own limits and
/// the modes already served are the pool's to check).
pub(super) fn check(register: &Register) -> Result<Checked, RegisterError> {
    let name = register.name.trim();
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(RegisterError::Invalid(
            "Register.name must be 1 to 128 bytes".into(),
        ));
    }
    if register.entities.is_empty() && !register.pass_through {
        return Err(RegisterError::Invalid(
            "Register must name at least one entity or set pass_through".into(),
        ));
    }
    if register.entities.len() > MAX_ENTITIES_PER_STREAM {
        return Err(RegisterError::Invalid(format!(
            "Register names {} entities; at most {MAX_ENTITIES_PER_STREAM} per stream",
            register.entities.len()
        )));
    }
    let mut entities: Vec<(Arc<str>, FetchMode)> = Vec::with_capacity(register.entities.len());
    let mut refresh: Vec<(Arc<str>, u32)> = Vec::new();
    // Linear in the entities named, whatever their number.
    let mut named: HashSet<&str> = HashSet::with_capacity(register.entities.len());
    for reg in &register.entities {
        validate_part("entity", &reg.entity)
            .map_err(|err| RegisterError::Invalid(format!("Register.entities: {err}")))?;
        let mode = match FetchMode::try_from(reg.fetch_mode) {
            Ok(FetchMode::Unspecified) => FetchMode::PerSubscriber,
            Ok(mode) => mode,
            Err(_) => {
                return Err(RegisterError::Invalid(format!(
                    "entity {:?}: unknown fetch_mode {}",
                    reg.entity, reg.fetch_mode
                )));
            }
        };
        if !named.insert(reg.entity.as_str()) {
            return Err(RegisterError::Invalid(format!(
                "entity {:?} registered twice",
                reg.entity
            )));
        }
        let interval = reg.refresh_interval_ms;
        if interval != 0 && !(MIN_REFRESH_INTERVAL_MS..=MAX_REFRESH_INTERVAL_MS).contains(&interval)
        {
            return Err(RegisterError::Invalid(format!(
                "entity {:?}: refresh_interval_ms {interval} is out of range: 0 (none) or \
                 {MIN_REFRESH_INTERVAL_MS} to {MAX_REFRESH_INTERVAL_MS}",
                reg.entity
            )));
        }
        let entity: Arc<str> = Arc::from(reg.entity.as_str());
        if interval != 0 {
            refresh.push((entity.clone(), interval));
        }
        entities.push((entity, mode));
    }
    Ok(Checked {
        name: Arc::from(name),
        entities,
        refresh,
    })
}

/// The refresh intervals the registered streams asked for, per stream.
/// An entity's interval is the smallest any of its streams asked for: the
/// most eager backend decides, and streams without one don't turn it off.
#[derive(Default)]
pub(super) struct RefreshIntervals {
    by_stream: HashMap<ResolverId, Vec<(Arc<str>, u32)>>,
}

impl RefreshIntervals {
    /// Stream `id` registered with these intervals (nothing kept if none).
    pub(super) fn add(&mut self, id: ResolverId, intervals: Vec<(Arc<str>, u32)>) {
        if !intervals.is_empty() {
            self.by_stream.insert(id, intervals);
        }
    }

    /// Stream `id` went away.
    pub(super) fn remove(&mut self, id: ResolverId) {
        self.by_stream.remove(&id);
    }

    pub(super) fn clear(&mut self) {
        self.by_stream.clear();
    }

    /// The interval of `entity`, if any stream asked for one.
    pub(super) fn of(&self, entity: &str) -> Option<u32> {
        self.by_stream
            .values()
            .flatten()
            .filter(|(e, _)| **e == *entity)
            .map(|&(_, ms)| ms)
            .min()
    }

    /// Every entity with an interval, and that interval.
    pub(super) fn all(&self) -> HashMap<Arc<str>, u32> {
        let mut all: HashMap<Arc<str>, u32> = HashMap::new();
        for (entity, ms) in self.by_stream.values().flatten() {
            all.entry(entity.clone())
                .and_modify(|known| *known = (*known).min(*ms))
                .or_insert(*ms);
        }
        all
    }
}

/// The `max_in_flight` a stream gets: its own, capped, or `default`.
pub(super) fn max_in_flight(register: &Register, default: u32) -> u32 {
    match register.max_in_flight {
        0 => default,
        n => n.min(MAX_IN_FLIGHT_CAP),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::EntityRegistration;

    fn register(name: &str, entities: &[(&str, i32)], pass_through: bool) -> Register {
        Register {
            name: name.into(),
            entities: entities
                .iter()
                .map(|&(entity, fetch_mode)| EntityRegistration {
                    entity: entity.into(),
                    fetch_mode,
                    refresh_interval_ms: 0,
                })
                .collect(),
            pass_through,
            max_in_flight: 0,
        }
    }

    fn refusal(register: &Register) -> String {
        match check(register) {
            Err(RegisterError::Invalid(m)) => m,
            Err(other) => panic!("Invalid expected, got {other:?}"),
            Ok(_) => panic!("a refusal expected"),
        }
    }

    #[test]
    fn names_entities_and_modes_are_checked_with_the_same_messages() {
        let shared = FetchMode::Shared as i32;
        assert_eq!(
            refusal(&register("  ", &[("items", shared)], false)),
            "Register.name must be 1 to 128 bytes"
        );
        assert_eq!(
            refusal(&register("svc", &[], false)),
            "Register must name at least one entity or set pass_through"
        );
        assert_eq!(
            refusal(&register("svc", &[("items", 42)], false)),
            "entity \"items\": unknown fetch_mode 42"
        );
        assert_eq!(
            refusal(&register(
                "svc",
                &[("items", shared), ("items", shared)],
                false
            )),
            "entity \"items\" registered twice"
        );
        assert!(
            refusal(&register("svc", &[("", shared)], false)).starts_with("Register.entities: ")
        );
        let checked = check(&register(" svc ", &[("items", 0)], false)).unwrap();
        assert_eq!(&*checked.name, "svc");
        assert_eq!(
            checked.entities,
            vec![(Arc::from("items"), FetchMode::PerSubscriber)],
            "an unspecified mode is PER_SUBSCRIBER"
        );
        assert!(
            check(&register("svc", &[], true)).is_ok(),
            "pass-through only"
        );
    }

    #[test]
    fn max_in_flight_defaults_and_is_capped() {
        let mut reg = register("svc", &[], true);
        assert_eq!(max_in_flight(&reg, 7), 7);
        reg.max_in_flight = 3;
        assert_eq!(max_in_flight(&reg, 7), 3);
        reg.max_in_flight = MAX_IN_FLIGHT_CAP + 1;
        assert_eq!(max_in_flight(&reg, 7), MAX_IN_FLIGHT_CAP);
    }

    #[test]
    fn refresh_intervals_are_bounded_and_the_smallest_wins() {
        let shared = FetchMode::Shared as i32;
        let mut reg = register("svc", &[("items", shared), ("docs", shared)], false);
        reg.entities[0].refresh_interval_ms = 500;
        assert_eq!(
            refusal(&reg),
            "entity \"items\": refresh_interval_ms 500 is out of range: 0 (none) or 1000 to 86400000"
        );
        reg.entities[0].refresh_interval_ms = MAX_REFRESH_INTERVAL_MS + 1;
        assert!(refusal(&reg).contains("refresh_interval_ms 86400001 is out of range"));
        reg.entities[0].refresh_interval_ms = MIN_REFRESH_INTERVAL_MS;
        let checked = check(&reg).unwrap();
        assert_eq!(
            checked.refresh,
            vec![(Arc::from("items"), MIN_REFRESH_INTERVAL_MS)],
            "docs has none"
        );

        let mut intervals = RefreshIntervals::default();
        intervals.add(1, vec![(Arc::from("items"), 5_000)]);
        intervals.add(
            2,
            vec![(Arc::from("items"), 2_000), (Arc::from("docs"), 9_000)],
        );
        intervals.add(3, Vec::new());
        assert_eq!(intervals.of("items"), Some(2_000));
        assert_eq!(intervals.of("docs"), Some(9_000));
        assert_eq!(intervals.of("other"), None);
        intervals.remove(2);
        assert_eq!(intervals.of("items"), Some(5_000));
        assert_eq!(intervals.of("docs"), None);
        assert_eq!(
            intervals.all(),
            HashMap::from([(Arc::from("items"), 5_000)])
        );
    }
}
