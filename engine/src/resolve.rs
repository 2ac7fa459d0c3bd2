//! Resolve stage: called number → its [`Subscription`], from a moka cache over the store.
//!
//! Almost every CDR is for a number without the service. Those are answered from an
//! in-memory set of the numbers that have it, built from the store at start, without
//! touching the cache or sled; the cache then holds subscriptions only. The store tells
//! the resolver of every write, which updates the set and drops the cached entry at
//! once; a load racing with a write is not cached (see [`Resolver::resolve`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashSet;
use moka::sync::Cache;

use crate::address::DestinationAddress;
use crate::phone::PhoneNumber;
use crate::store::{NumberRecord, Store, StoreError};

/// A number's call-notification settings, compiled for the filter: only checked
/// destinations and designated numbers are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub number: PhoneNumber,
    /// 開始 (R-N1).
    pub enabled: bool,
    /// Destinations whose 送信 check is on (R-N2).
    pub recipients: Vec<DestinationAddress>,
    /// 指定した電話番号からの着信のみ (R-N4).
    pub designated_only: bool,
    /// 応答できなかった着信のみ (R-N4).
    pub missed_only: bool,
    /// Designated numbers whose 指定 check is on (R-N5).
    pub designated: Vec<PhoneNumber>,
    /// [`NumberRecord::moved_in_at`]: calls before it were another subscriber's.
    pub moved_in_at: Option<i64>,
}

impl Subscription {
    /// The subscription of a stored number; `None` unless call notification is
    /// contracted on it.
    pub fn from_record(record: &NumberRecord) -> Option<Self> {
        if !record.services.call {
            return None;
        }
        let call = &record.call;
        Some(Self {
            number: record.number,
            enabled: call.enabled,
            recipients: call.destinations.iter().filter(|d| d.send).map(|d| d.address.clone()).collect(),
            designated_only: call.designated_only,
            missed_only: call.missed_only,
            designated: call.designated.iter().filter(|d| d.designate).map(|d| d.number).collect(),
            moved_in_at: record.moved_in_at,
        })
    }
}

/// What resolving a number gives: its subscription, or `None` for "no service".
type Entry = Option<Arc<Subscription>>;

/// Caches `subscription`, read when the invalidations stood at `read_at`, unless a
/// write came since. A write bumps the generation before it invalidates: one whose
/// invalidation came before this insert has bumped it before the second look, which
/// takes the stale value out again.
fn cache_unless_written(
    cache: &Cache<PhoneNumber, Arc<Subscription>>,
    generation: &AtomicU64,
    read_at: u64,
    number: PhoneNumber,
    subscription: Arc<Subscription>,
) {
    if generation.load(Ordering::Acquire) != read_at {
        return;
    }
    cache.insert(number, subscription);
    if generation.load(Ordering::Acquire) != read_at {
        cache.invalidate(&number);
    }
}

/// Finds subscriptions; cheap to clone, one cache shared by all clones.
#[derive(Clone)]
pub struct Resolver {
    store: Store,
    cache: Cache<PhoneNumber, Arc<Subscription>>,
    /// Every number with call notification contracted (着信お知らせメール契約番号).
    subscribed: Arc<DashSet<PhoneNumber>>,
    /// Bumped by every invalidation; a load that saw it change does not cache.
    generation: Arc<AtomicU64>,
}

impl Resolver {
    /// A resolver over `store` caching at most `capacity` subscriptions. Reads the index
    /// of subscribed numbers once, and caches the first `capacity` subscriptions: call
    /// it where blocking is fine.
    pub fn new(store: Store, capacity: u64) -> Result<Self, StoreError> {
        let cache: Cache<PhoneNumber, Arc<Subscription>> = Cache::new(capacity);
        let subscribed = Arc::new(DashSet::new());
        let generation = Arc::new(AtomicU64::new(0));
        {
            let (cache, subscribed, generation) = (cache.clone(), subscribed.clone(), generation.clone());
            store.on_number_change(move |number, services| {
                generation.fetch_add(1, Ordering::AcqRel);
                if services.is_some_and(|s| s.call) {
                    subscribed.insert(*number);
                } else {
                    subscribed.remove(number);
                }
                cache.invalidate(number);
            });
        }
        // After registering, so a write during the scan is not missed. The cache is
        // filled on the way, up to its capacity, so the first calls after a start do not
        // each read sled; a write during the scan stops that (its record may be stale).
        let scan_start = generation.load(Ordering::Acquire);
        let mut warm = 0;
        for number in store.subscribed_numbers() {
            let number = number?;
            subscribed.insert(number);
            if warm < capacity && generation.load(Ordering::Acquire) == scan_start {
                let record = match store.number(&number) {
                    Ok(record) => record,
                    // Its calls are dead-lettered when they come (an ERROR each, counted);
                    // the others are served.
                    Err(StoreError::UnreadableNumber { number, why }) => {
                        tracing::warn!(%number, error = %why, "a subscribed number's record cannot be read: its calls go to the dead letters");
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let Some(subscription) = record.as_ref().and_then(Subscription::from_record) else {
                    continue;
                };
                cache_unless_written(&cache, &generation, scan_start, number, Arc::new(subscription));
                warm += 1;
            }
        }
        Ok(Self { store, cache, subscribed, generation })
    }

    /// The subscription of `called`, or `None` if it has no call notification.
    ///
    /// A miss reads sled, which may touch the disk: call this from the source thread or
    /// a blocking task, never on an async worker.
    pub fn resolve(&self, called: &PhoneNumber) -> Result<Entry, StoreError> {
        if !self.subscribed.contains(called) {
            return Ok(None);
        }
        if let Some(hit) = self.cache.get(called) {
            return Ok(Some(hit));
        }
        let before = self.generation.load(Ordering::Acquire);
        let loaded = self.store.number(called)?.and_then(|r| Subscription::from_record(&r)).map(Arc::new);
        if let Some(sub) = &loaded {
            cache_unless_written(&self.cache, &self.generation, before, *called, sub.clone());
        }
        Ok(loaded)
    }

    /// How many numbers have call notification contracted.
    pub fn subscribed_numbers(&self) -> usize {
        self.subscribed.len()
    }

    /// How many subscriptions the cache holds.
    pub fn cached_subscriptions(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CallSettings, Destination, LineRecord, Services};

    fn number(s: &str) -> PhoneNumber {
        PhoneNumber::parse(s).unwrap()
    }

    fn provision(store: &Store, n: &str, settings: CallSettings) {
        let line = LineRecord { contract: number(n), numbers: vec![number(n)], unit: None };
        let services = Services { call: true, fax: false };
        store.upsert_line(&line, &[(number(n), services, Some(settings))]).unwrap();
    }

    #[test]
    fn a_saved_setting_governs_the_very_next_lookup() {
        let store = Store::temporary().unwrap();
        let resolver = Resolver::new(store.clone(), 100).unwrap();
        let n = number("0312345678");
        assert_eq!(resolver.resolve(&n).unwrap(), None, "unknown number has no service");

        provision(&store, "0312345678", CallSettings { enabled: true, ..Default::default() });
        let sub = resolver.resolve(&n).unwrap().expect("provisioned");
        assert!(sub.enabled);

        let dest = Destination { address: DestinationAddress::parse("a@example.jp").unwrap(), send: true };
        let settings = CallSettings { enabled: false, destinations: vec![dest], ..Default::default() };
        store.save_call_settings(&n, sub_version(&store, &n), settings).unwrap();
        let sub = resolver.resolve(&n).unwrap().expect("still provisioned");
        assert!(!sub.enabled, "R-N1: stop takes effect at once");
        assert_eq!(sub.recipients.len(), 1);
    }

    #[test]
    fn contracting_or_ending_the_service_applies_at_once_and_survives_a_restart() {
        let store = Store::temporary().unwrap();
        let resolver = Resolver::new(store.clone(), 100).unwrap();
        let n = number("0312345678");
        provision(&store, "0312345678", CallSettings { enabled: true, ..Default::default() });
        assert!(resolver.resolve(&n).unwrap().is_some());
        assert_eq!(resolver.subscribed_numbers(), 1);

        // The operator ends call notification (fax only now): no subscription any more.
        let line = LineRecord { contract: n, numbers: vec![n], unit: None };
        store.upsert_line(&line, &[(n, Services { call: false, fax: true }, None)]).unwrap();
        assert_eq!(resolver.resolve(&n).unwrap(), None);

        // A resolver built later (a restart) indexes what the store holds.
        provision(&store, "0312345678", CallSettings { enabled: true, ..Default::default() });
        let restarted = Resolver::new(store.clone(), 100).unwrap();
        assert!(restarted.resolve(&n).unwrap().is_some());
        assert!(resolver.resolve(&n).unwrap().is_some(), "and the running one saw it too");
    }

    #[test]
    fn a_started_resolver_has_the_subscriptions_cached_up_to_its_capacity_and_saves_still_apply() {
        let store = Store::temporary().unwrap();
        for n in ["0312345601", "0312345602", "0312345603"] {
            provision(&store, n, CallSettings { enabled: true, ..Default::default() });
        }
        let resolver = Resolver::new(store.clone(), 2).unwrap();
        assert_eq!(resolver.cached_subscriptions(), 2, "filled at start, never past the capacity");
        assert_eq!(Resolver::new(store.clone(), 100).unwrap().cached_subscriptions(), 3);

        // R-N1: stopping takes effect at once, cached at start or not.
        for n in ["0312345601", "0312345602", "0312345603"].map(number) {
            let settings = CallSettings { enabled: false, ..Default::default() };
            store.save_call_settings(&n, sub_version(&store, &n), settings).unwrap();
            assert!(!resolver.resolve(&n).unwrap().expect("provisioned").enabled);
        }
    }

    /// A start reads the index of subscribed numbers, not every record: it must follow
    /// every way a number gains or loses the service (R-C1), written here or applied
    /// from the state topic by a node catching up.
    #[test]
    fn r_c1_a_start_knows_exactly_the_numbers_with_call_notification_however_they_got_there() {
        let store = Store::temporary().unwrap();
        let (a, b, c) = (number("0312345601"), number("0312345602"), number("0312345603"));
        let call = Services { call: true, fax: false };
        let line = LineRecord { contract: a, numbers: vec![a, b, c], unit: None };
        store
            .upsert_line(&line, &[(a, call, None), (b, call, None), (c, Services { call: false, fax: true }, None)])
            .unwrap();
        // b leaves the line; c gains the service, then moves to a line of its own.
        let line = LineRecord { contract: a, numbers: vec![a, c], unit: None };
        store.upsert_line(&line, &[(a, call, None), (c, call, None)]).unwrap();
        let own = LineRecord { contract: c, numbers: vec![c], unit: None };
        store.upsert_line(&own, &[(c, call, None)]).unwrap();
        let started = Resolver::new(store.clone(), 100).unwrap();
        assert_eq!(started.subscribed_numbers(), 2);
        assert!(started.resolve(&a).unwrap().is_some() && started.resolve(&c).unwrap().is_some());
        assert_eq!(started.resolve(&b).unwrap(), None);

        // A node catching up applies the same values with nobody listening yet.
        let caught_up = Store::temporary().unwrap();
        let values: Vec<_> =
            store.state_entries().map(|kv| kv.map(|(k, v)| (k, Some(v.to_vec())))).collect::<Result<_, _>>().unwrap();
        caught_up.apply_state(&values, values.len() as i64, None, &[]).unwrap();
        let removed = [(crate::store::state::StateKey::number(crate::store::state::StateTree::Numbers, &c), None)];
        caught_up.apply_state(&removed, values.len() as i64 + 1, None, &[]).unwrap();
        let started = Resolver::new(caught_up, 100).unwrap();
        assert_eq!(started.subscribed_numbers(), 1, "a and nothing else: c's record was deleted");
        assert!(started.resolve(&a).unwrap().is_some());
    }

    /// While a cluster is upgraded one node at a time, a node of this version applies
    /// number records a newer one wrote, with fields this version does not know: it
    /// passes over them and notifies by the settings it knows (R-N1, R-N2, R-N5), and
    /// its view goes on applying what follows. Such a record stopped a serving node's
    /// view: it was tried again every second, every later write unapplied.
    #[test]
    fn r_n1_a_record_a_newer_version_wrote_is_applied_and_notifies_by_the_settings_this_one_knows() {
        let newer = Store::temporary().unwrap();
        let dest = |a: &str, send| Destination { address: DestinationAddress::parse(a).unwrap(), send };
        let settings = CallSettings {
            enabled: true,
            destinations: vec![dest("on@example.jp", true), dest("off@example.jp", false)],
            designated_only: true,
            designated: vec![crate::store::Designated { number: number("09011112222"), designate: true, row: None }],
            ..Default::default()
        };
        let line = LineRecord { contract: number("0312345678"), numbers: vec![number("0312345678")], unit: None };
        let both = Services { call: true, fax: true };
        newer.upsert_line(&line, &[(number("0312345678"), both, Some(settings))]).unwrap();
        let fax = crate::store::FaxSettings {
            enabled: true,
            destinations: vec![dest("fax@example.jp", true)],
            ..Default::default()
        };
        newer.save_fax_settings(&number("0312345678"), 0, fax).unwrap();
        let mut values: Vec<_> =
            newer.state_entries().map(|kv| kv.map(|(k, v)| (k, Some(v.to_vec())))).collect::<Result<_, _>>().unwrap();
        for (key, value) in &mut values {
            if key.tree != crate::store::state::StateTree::Numbers {
                continue;
            }
            let mut record: serde_json::Value = serde_json::from_slice(value.as_ref().unwrap()).unwrap();
            record["nickname"] = "home".into();
            record["call"]["quiet_hours"] = serde_json::json!({"from": "22:00", "to": "07:00"});
            record["call"]["destinations"][0]["label"] = "mine".into();
            record["call"]["designated"][0]["label"] = "mother".into();
            record["fax"]["resolution"] = "fine".into();
            record["fax"]["destinations"][0]["label"] = "office".into();
            *value = Some(serde_json::to_vec(&record).unwrap());
        }

        let view = Store::temporary().unwrap();
        let serving = Resolver::new(view.clone(), 100).unwrap();
        view.apply_state(&values, values.len() as i64, None, &[]).expect("a newer version's record applies");
        let sub = serving.resolve(&number("0312345678")).unwrap().expect("subscribed");
        assert!(sub.enabled && sub.designated_only);
        assert_eq!(sub.recipients, vec![DestinationAddress::parse("on@example.jp").unwrap()]);
        assert_eq!(sub.designated, vec![number("09011112222")]);
        let record = view.number(&number("0312345678")).unwrap().unwrap();
        assert!(record.fax.enabled && record.fax.destinations.len() == 1, "{:?}", record.fax);

        // The view goes on: a line written after it is applied too.
        provision(&newer, "0312345679", CallSettings { enabled: true, ..Default::default() });
        let next: Vec<_> = newer
            .state_entries()
            .map(|kv| kv.map(|(k, v)| (k, Some(v.to_vec()))))
            .filter(|kv| kv.as_ref().map_or(true, |(k, _)| k.id.ends_with("79")))
            .collect::<Result<_, _>>()
            .unwrap();
        view.apply_state(&next, values.len() as i64 + next.len() as i64, None, &[]).unwrap();
        assert!(serving.resolve(&number("0312345679")).unwrap().is_some());
    }

    fn sub_version(store: &Store, n: &PhoneNumber) -> u64 {
        store.number(n).unwrap().unwrap().call.version
    }

    #[test]
    fn only_checked_destinations_and_designated_numbers_are_kept() {
        let store = Store::temporary().unwrap();
        let resolver = Resolver::new(store.clone(), 100).unwrap();
        let dest = |a: &str, send| Destination { address: DestinationAddress::parse(a).unwrap(), send };
        let settings = CallSettings {
            enabled: true,
            destinations: vec![dest("on@example.jp", true), dest("off@example.jp", false)],
            designated: vec![
                crate::store::Designated { number: number("09011112222"), designate: true, row: None },
                crate::store::Designated { number: number("09033334444"), designate: false, row: None },
            ],
            ..Default::default()
        };
        provision(&store, "0312345678", settings);
        let sub = resolver.resolve(&number("0312345678")).unwrap().unwrap();
        assert_eq!(sub.recipients, vec![DestinationAddress::parse("on@example.jp").unwrap()]);
        assert_eq!(sub.designated, vec![number("09011112222")]);
    }
}
