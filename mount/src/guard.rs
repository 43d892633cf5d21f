//! The mass-removal guard: a remote that suddenly lacks most of the tree (an empty volume
//! mounted late, the wrong directory served, a pod replaced by one with a fresh filesystem)
//! must not turn into the local view losing most of its entries, with the session's work in
//! editors and tools suddenly pointing at nothing.
//!
//! Removals the remote reports (watcher events, a rescan's sweep) or that a reconciliation
//! finds are checked here before they are applied. A removal that [`GuardConfig::trips`] is
//! held instead: nothing is removed locally (additions and updates still are), `kmount status`
//! says so, and the log says what to do. The hold ends
//! - when the user confirms (`kmount confirm MOUNTPOINT`, [`Guard::confirm`]): the next
//!   reconciliation applies everything;
//! - or by itself when a reconciliation finds that the remote has the entries again (the
//!   removal it would make no longer trips).
//!
//! While a hold lasts, every removal waits (also small ones): the reconciliation after the
//! hold applies the remote's state as it then is.
//!
//! The guard only decides; the callers ([`crate::remote`], [`crate::reconcile`]) count what
//! they would remove and apply or leave it. Its state lives in [`crate::remote::SyncStats`].

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use crate::tree::TreeState;

/// When a removal counts as a mass removal.
///
/// A removal trips the guard when it takes away more than [`GuardConfig::min_entries`]
/// entries *and* more than [`GuardConfig::percent`] percent of the entries the tree holds.
/// The defaults (100 entries, 50 %) are chosen so that:
/// - everyday remote deletes show at once: an `rm -rf` of a 50-file directory, a `make
///   clean`, a `git checkout` of another branch, a cleared cache directory are below one
///   or the other bound in any tree worth guarding;
/// - the failures the guard is for are caught: each of them empties all or nearly all of the
///   tree, far above half of it;
/// - small trees (at most 100 entries) are never held: losing them is cheap to notice and
///   redo, and a scratch directory emptied by a script is common there.
///
/// A reconciliation is judged as one removal: everything it would remove, counted before
/// anything is applied. Watcher removals arrive in batches over time (an `rm -rf` of many
/// files takes several), and a batch says nothing about the whole: they are applied at once
/// while the removals of the last [`GuardConfig::window`] add up to at most
/// [`GuardConfig::min_entries`] (so small deletes show within milliseconds), and beyond that
/// left to a reconciliation run once they stop for [`GuardConfig::settle`], which judges the
/// whole burst. So at most `min_entries` entries of a mass removal the watcher reports leave
/// the view before the guard holds the rest; a mass removal found by a reconciliation (a new
/// pod, an agent started again on another directory, changes while disconnected) leaves none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardConfig {
    /// More than this many entries must go. `u64::MAX` turns the guard off.
    pub min_entries: u64,
    /// And more than this percentage of the entries the tree holds.
    pub percent: u64,
    /// Watcher removals this close together count as one burst.
    pub window: Duration,
    /// A burst held for judging is judged (by a reconciliation) once no removal came for
    /// this long,
    pub settle: Duration,
    /// or this long after it began at the latest: removals that never pause for `settle` (a
    /// tool in the container deleting files steadily) are judged in rounds rather than held
    /// for as long as they go on.
    pub judge_within: Duration,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            min_entries: 100,
            percent: 50,
            window: Duration::from_secs(3),
            settle: Duration::from_millis(300),
            judge_within: Duration::from_secs(2),
        }
    }
}

impl GuardConfig {
    /// The guard off: every removal is applied.
    pub fn off() -> Self {
        Self {
            min_entries: u64::MAX,
            ..Self::default()
        }
    }

    /// Whether removing `removing` of `known` entries is a mass removal.
    pub fn trips(&self, known: u64, removing: u64) -> bool {
        removing > self.min_entries
            && u128::from(removing) * 100 > u128::from(known) * u128::from(self.percent)
    }
}

/// What found the removals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Watcher,
    Reconciliation,
    Rescan,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Watcher => "the remote's change events",
            Source::Reconciliation => "a reconciliation",
            Source::Rescan => "a walk of the remote",
        })
    }
}

/// A mass removal not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub since: SystemTime,
    /// Entries the latest check would have removed.
    pub removing: u64,
    /// Entries the tree held then.
    pub known: u64,
    pub source: Source,
}

impl Held {
    /// One line for status and logs.
    pub fn describe(&self) -> String {
        format!(
            "{} of {} entries are missing on the remote ({}); their removal is paused",
            self.removing, self.known, self.source
        )
    }
}

/// What to do with a removal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Apply,
    /// Leave it: a hold is (or just became) in force.
    Hold,
}

/// The guard's state. See the module documentation.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    pub config: GuardConfig,
    held: Option<Held>,
    /// The user confirmed the held removal; the next reconciliation applies everything.
    confirmed: bool,
    /// Watcher removals applied recently: (when, how many).
    recent: VecDeque<(Instant, u64)>,
    /// A burst of watcher removals waits for the reconciliation due then.
    judge_at: Option<Instant>,
    /// When the burst waiting for judging began.
    burst_since: Option<Instant>,
}

impl Guard {
    pub fn new(config: GuardConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    /// The hold in force, if any.
    pub fn held(&self) -> Option<&Held> {
        self.held.as_ref()
    }

    /// Whether the user confirmed and the confirming reconciliation has not run yet.
    pub fn confirmed(&self) -> bool {
        self.confirmed
    }

    /// The user confirms: the held removal (and any other) is applied by the next
    /// reconciliation. Returns the hold it confirms (`None`: nothing was held).
    pub fn confirm(&mut self) -> Option<Held> {
        let held = self.held.clone();
        if held.is_some() {
            self.confirmed = true;
        }
        held
    }

    /// When a reconciliation is due to judge a burst of watcher removals.
    pub fn judge_at(&self) -> Option<Instant> {
        self.judge_at
    }

    /// The judging reconciliation starts (or cannot run): no longer due.
    pub fn judged(&mut self) {
        self.judge_at = None;
        self.burst_since = None;
    }

    /// A batch of watcher removals of `removing` entries. [`Verdict::Hold`]: not now (held,
    /// or waiting for the reconciliation at [`Guard::judge_at`]).
    pub fn check_burst(&mut self, now: Instant, removing: u64) -> Verdict {
        if removing == 0 || self.confirmed {
            return Verdict::Apply;
        }
        if let Some(h) = &mut self.held {
            h.removing = h.removing.max(removing);
            return Verdict::Hold;
        }
        let window = self.config.window;
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > window)
        {
            self.recent.pop_front();
        }
        let burst = removing + self.recent.iter().map(|(_, n)| n).sum::<u64>();
        if self.judge_at.is_some() || burst > self.config.min_entries {
            if self.judge_at.is_none() {
                tracing::info!(
                    "the remote reports {burst} removals in a row; the next ones wait for a \
                     reconciliation to judge them as a whole"
                );
            }
            let since = *self.burst_since.get_or_insert(now);
            self.judge_at = Some((now + self.config.settle).min(since + self.config.judge_within));
            return Verdict::Hold;
        }
        self.recent.push_back((now, removing));
        Verdict::Apply
    }

    /// A rescan's sweep would remove `removing` of the `known` entries (counted only when
    /// `removing` could trip).
    pub fn check_once(&mut self, removing: u64, known: impl FnOnce() -> u64) -> Verdict {
        if removing == 0 || self.confirmed {
            return Verdict::Apply;
        }
        if let Some(h) = &mut self.held {
            h.removing = h.removing.max(removing);
            return Verdict::Hold;
        }
        if removing > self.config.min_entries {
            let known = known();
            if self.config.trips(known, removing) {
                self.hold(removing, known, Source::Rescan);
                return Verdict::Hold;
            }
        }
        Verdict::Apply
    }

    /// A reconciliation would remove `removing` of the `known` entries. A hold in force ends
    /// when the removal no longer trips (the remote has the entries again) or was confirmed.
    pub fn check_reconciliation(&mut self, removing: u64, known: u64) -> Verdict {
        self.judged();
        if self.confirmed {
            return Verdict::Apply;
        }
        if self.config.trips(known, removing) {
            match &mut self.held {
                Some(h) => {
                    h.removing = removing;
                    h.known = known;
                }
                None => self.hold(removing, known, Source::Reconciliation),
            }
            return Verdict::Hold;
        }
        if let Some(h) = self.held.take() {
            tracing::info!(
                "the remote has the entries again ({removing} of {known} missing now, {} \
                 before): the paused removal is called off",
                h.removing
            );
        }
        Verdict::Apply
    }

    /// A reconciliation applied everything (after a confirmation, or with nothing held).
    pub fn settled(&mut self) {
        if self.confirmed
            && let Some(h) = self.held.take()
        {
            tracing::info!("applied the confirmed removal of {} entries", h.removing);
        }
        self.confirmed = false;
        self.recent.clear();
    }

    fn hold(&mut self, removing: u64, known: u64, source: Source) {
        let held = Held {
            since: SystemTime::now(),
            removing,
            known,
            source,
        };
        tracing::warn!(
            "{}: the remote may have lost its files (an empty volume, the wrong directory, a \
             new pod). The mount keeps showing them. If the remote is right, run `kmount \
             confirm MOUNTPOINT` to apply the removal; otherwise fix the remote, and the pause \
             ends by itself once a reconciliation finds the entries again",
            held.describe()
        );
        self.held = Some(held);
    }
}

/// Entries in the subtree of `id` (itself included).
pub fn subtree_size(t: &TreeState, id: u64) -> u64 {
    let mut n = 0;
    let mut stack = vec![id];
    while let Some(id) = stack.pop() {
        n += 1;
        if t.is_dir(id) {
            stack.extend(t.listing(id).into_iter().map(|l| l.id));
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> Guard {
        Guard::new(GuardConfig::default())
    }

    #[test]
    fn thresholds() {
        let c = GuardConfig::default();
        // An rm -rf of a 50-file directory: never.
        assert!(!c.trips(60, 51));
        // A small tree emptied: not held.
        assert!(!c.trips(100, 100));
        // Less than half of a big tree: shown at once.
        assert!(!c.trips(1000, 400));
        assert!(!c.trips(1000, 500));
        // The root emptied, or most of it.
        assert!(c.trips(500, 500));
        assert!(c.trips(1000, 501));
        assert!(c.trips(101, 101));
        assert!(!GuardConfig::off().trips(1000, 1000));
    }

    #[test]
    fn a_reconciliation_holds_until_the_entries_come_back() {
        let mut g = guard();
        assert_eq!(g.check_reconciliation(10, 500), Verdict::Apply);
        assert!(g.held().is_none());
        assert_eq!(g.check_reconciliation(500, 500), Verdict::Hold);
        let h = g.held().unwrap().clone();
        assert_eq!(
            (h.removing, h.known, h.source),
            (500, 500, Source::Reconciliation)
        );
        assert!(h.describe().contains("500 of 500"));
        // Still missing: still held.
        assert_eq!(g.check_reconciliation(499, 500), Verdict::Hold);
        // Back (a few removed meanwhile): applied, the hold ends by itself.
        assert_eq!(g.check_reconciliation(3, 500), Verdict::Apply);
        assert!(g.held().is_none());
    }

    #[test]
    fn a_rescan_holds_a_mass_removal_only() {
        let mut g = guard();
        assert_eq!(g.check_once(150, || 1000), Verdict::Apply);
        assert_eq!(g.check_once(50, || unreachable!()), Verdict::Apply);
        assert_eq!(g.check_once(600, || 1000), Verdict::Hold);
        assert_eq!(g.held().unwrap().source, Source::Rescan);
        assert_eq!(
            g.check_once(1, || 1000),
            Verdict::Hold,
            "held: everything waits"
        );
    }

    #[test]
    fn a_confirmation_lets_the_next_reconciliation_apply() {
        let mut g = guard();
        assert!(g.confirm().is_none(), "nothing to confirm");
        assert!(!g.confirmed());
        assert_eq!(g.check_reconciliation(500, 500), Verdict::Hold);
        assert!(g.confirm().is_some());
        assert!(g.confirmed());
        // Watcher removals meanwhile are applied too.
        assert_eq!(g.check_burst(Instant::now(), 500), Verdict::Apply);
        assert_eq!(g.check_reconciliation(500, 500), Verdict::Apply);
        g.settled();
        assert!(g.held().is_none());
        assert!(!g.confirmed());
        // A later mass removal is held again.
        assert_eq!(g.check_reconciliation(400, 400), Verdict::Hold);
    }

    #[test]
    fn small_watcher_removals_apply_at_once_and_a_big_burst_waits_for_judging() {
        let mut g = guard();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        // An rm -rf of 50 files, in two batches: at once.
        assert_eq!(g.check_burst(at(0), 30), Verdict::Apply);
        assert_eq!(g.check_burst(at(5), 20), Verdict::Apply);
        assert_eq!(g.judge_at(), None);
        // More in the same burst, past 100: waits for a reconciliation.
        assert_eq!(g.check_burst(at(10), 60), Verdict::Hold);
        assert_eq!(g.judge_at(), Some(at(310)));
        // Every further batch waits too and pushes the judging back.
        assert_eq!(g.check_burst(at(100), 1), Verdict::Hold);
        assert_eq!(g.judge_at(), Some(at(400)));
        assert!(
            g.held().is_none(),
            "not held yet: judged by the reconciliation"
        );
        // The reconciliation finds 400 of 450 missing: held.
        assert_eq!(g.check_reconciliation(400, 450), Verdict::Hold);
        assert_eq!(g.judge_at(), None);
        assert_eq!(g.held().unwrap().source, Source::Reconciliation);
        // While held, even a single removal waits.
        assert_eq!(g.check_burst(at(60_000), 1), Verdict::Hold);
    }

    #[test]
    fn a_big_legitimate_burst_is_applied_by_its_judging_reconciliation() {
        let mut g = guard();
        let t0 = Instant::now();
        assert_eq!(g.check_burst(t0, 200), Verdict::Hold);
        assert!(g.judge_at().is_some());
        assert_eq!(g.check_reconciliation(200, 1000), Verdict::Apply);
        g.settled();
        assert!(g.held().is_none());
        assert_eq!(g.judge_at(), None);
    }

    #[test]
    fn steady_removals_are_judged_in_rounds() {
        let mut g = guard();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        // A removal every 10 ms, never pausing for the settle time.
        let mut held_from = None;
        for i in 0..1000 {
            if g.check_burst(at(10 * i), 2) == Verdict::Hold {
                held_from.get_or_insert(10 * i);
            }
        }
        let first = held_from.expect("a steady stream of removals is a burst");
        assert_eq!(
            g.judge_at(),
            Some(at(first + 2000)),
            "judged within two seconds of the burst's start, not when it stops"
        );
        assert_eq!(g.check_reconciliation(100, 24_000), Verdict::Apply);
        g.settled();
        // The next round starts afresh.
        assert_eq!(g.check_burst(at(10_100), 2), Verdict::Apply);
    }

    #[test]
    fn spaced_out_removals_are_not_a_burst() {
        let mut g = guard();
        let t0 = Instant::now();
        for i in 0..10 {
            let t = t0 + Duration::from_secs(10 * i);
            assert_eq!(g.check_burst(t, 90), Verdict::Apply, "batch {i}");
        }
        assert!(g.held().is_none());
        assert_eq!(g.judge_at(), None);
        assert_eq!(g.check_burst(t0, 0), Verdict::Apply);
    }
}
