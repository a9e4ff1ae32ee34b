//! Pacing of a target's rounds under load: how long the next round waits.
//!
//! Every round pays fixed costs (a snapshot, a dozen statements on three connections, a durable
//! commit on the target) whatever it carries, so under a heavy load fewer, larger rounds cost
//! the machine less. Waiting costs latency, though, and the issue ranks latency above source
//! overhead. Two rules, one above the other:
//!
//! - **By the round's size** ([`round_pause`]): nothing after a light round (at most
//!   [`LIGHT_ROUND_CHANGES`] changes), then [`PAUSE_PER_CHANGE`] per change beyond, at most
//!   the normal cap (`max_round_pause`). At 200 and 1,000 transactions/s on a 2-core machine
//!   rounds carry 5–40 changes and start at once.
//! - **By the source's response** ([`Pacer`]): when nearly every round of a whole window
//!   ([`WINDOW`], [`SATURATED_SHARE`]) was paced (the source writes without let-up), the rounds
//!   wait the longer pause (`saturated_round_pause`) instead, and a trial decides whether it
//!   stays: windows
//!   under the longer pause, the normal pacing, the longer pause again; it stays when the
//!   source committed more changes per second under it ([`GAIN`]) — the sign that the rounds
//!   were taking CPU (or disk) from the application, not just adding latency to an application
//!   that waits for its own clients. Neither the change rate nor the rounds' size can tell a
//!   saturated source from a busy but unsaturated one (on a 2-core machine a saturated source
//!   wrote only 1.3–1.7 times as many changes per second as at 1,000 transactions/s, whose
//!   rounds are light); its response can. A longer pause that stays is tried again every
//!   [`HOLD`] and dropped at once when the load falls (a light round under it, or a window's
//!   change rate below [`FALL`] of what made it stay); one that did not pay is tried again
//!   after [`RETRY_FIRST`], doubling while the load stays. Latency under such a load is already
//!   a round and a pause or more; loads whose rounds are mostly light (200 and 1,000
//!   transactions/s here) are never tried. Under the normal pacing a light round now and then
//!   is part of a saturated load (a burst of commits landing just after a snapshot, a round
//!   delayed by a purge): it neither stops a window nor a trial.
//!
//! Rates are changes per second between round snapshots: a round's changes are those committed
//! between its snapshot and the previous round's, so a window's rate is its rounds' changes over
//! the time between the snapshot before its first round and its last round's.

use std::time::{Duration, Instant};

/// A round that applied at most this many changes is followed by the next at once. On a
/// 2-core machine, with pgbench-like writes of 4–5 changes a transaction and rounds back to
/// back, a round carries 5–10 changes at 200 transactions/s, about 40 at 1,000, and 400 and more
/// at full speed (2,000 and more) with the normal cap.
pub const LIGHT_ROUND_CHANGES: u64 = 50;
/// The pause after a round per change it applied beyond [`LIGHT_ROUND_CHANGES`].
pub const PAUSE_PER_CHANGE: Duration = Duration::from_micros(100);
/// How long each window of a trial measures the source's change rate. On a saturated 2-core
/// machine, pgbench's rate over a few seconds varies by about 5% with the pauses unchanged.
pub const WINDOW: Duration = Duration::from_secs(3);
/// A window of the normal pacing in which at least this share of the rounds was paced (more
/// than [`LIGHT_ROUND_CHANGES`] changes) shows a source writing without let-up. At 1,000
/// transactions/s on a 2-core machine 10–30% of the rounds are paced; at full speed nearly all,
/// but not all (a single light round every few seconds kept the longer pause from ever being
/// tried when every round had to be paced: two default benchmark runs with 867–1,204 rounds
/// in 30 s, none of them under it).
pub const SATURATED_SHARE: f64 = 0.8;
/// The longer pause is kept when the source's change rate under it was at least this fraction
/// above the rate under the normal pacing.
pub const GAIN: f64 = 0.02;
/// How long a longer pause that paid is kept before it is tried again.
pub const HOLD: Duration = Duration::from_secs(30);
/// After a trial that did not pay, the next waits this long, doubling up to [`RETRY_CAP`].
pub const RETRY_FIRST: Duration = Duration::from_secs(10);
pub const RETRY_CAP: Duration = Duration::from_secs(320);
/// Under the longer pause, a window whose rate falls below this fraction of the rate that made
/// it pay ends it: the load fell.
pub const FALL: f64 = 0.6;

/// How long the next round waits after one that applied `changes` changes: nothing after a
/// light round, then [`PAUSE_PER_CHANGE`] for every change beyond, at most `max` (zero: never).
///
/// A busier source makes larger rounds and so longer pauses, which make the rounds larger still,
/// until the cap; below the threshold rounds start at once. The measurements are in
/// docs/daemon.md (Performance).
pub fn round_pause(changes: u64, max: Duration) -> Duration {
    let beyond = changes.saturating_sub(LIGHT_ROUND_CHANGES);
    if beyond == 0 || max.is_zero() {
        return Duration::ZERO;
    }
    let beyond = u32::try_from(beyond).unwrap_or(u32::MAX);
    PAUSE_PER_CHANGE.saturating_mul(beyond).min(max)
}

/// Which cap the pauses follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// [`round_pause`] with the normal cap.
    Normal,
    /// The longer pause after every round that is not light.
    Long,
}

impl Mode {
    fn other(self) -> Mode {
        match self {
            Mode::Normal => Mode::Long,
            Mode::Long => Mode::Normal,
        }
    }
}

/// A decision of the pacer, for the log and the metrics: the end of a trial, or of the longer
/// pause when the load fell.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    /// The mode settled on.
    pub mode: Mode,
    /// Whether it differs from the mode settled before.
    pub changed: bool,
    /// Changes per second under the longer pause and under the normal cap, in the trial that
    /// decided (none when the load fell).
    pub rates: Option<(f64, f64)>,
}

/// A window being measured: rounds since the snapshot of the round that opened it.
#[derive(Clone, Copy, Debug)]
struct Window {
    mode: Mode,
    start: Instant,
    changes: u64,
    rounds: u32,
    /// Rounds that were not light.
    paced: u32,
}

/// The pacing state of one target's rounds.
#[derive(Debug)]
pub struct Pacer {
    normal: Duration,
    long: Duration,
    settled: Mode,
    window: Option<Window>,
    /// Changes per second in the finished windows of the trial under way, which are always
    /// longer, normal, longer.
    trial: Vec<f64>,
    /// No trial starts before this.
    trial_at: Instant,
    retry: Duration,
    /// The rate under the longer pause in the trial that settled it.
    long_rate: f64,
}

impl Pacer {
    /// `normal`: the cap of [`round_pause`] (zero: no pacing at all); `long`: the pause tried
    /// under a load without let-up (zero, or not above `normal`: never tried).
    pub fn new(normal: Duration, long: Duration, now: Instant) -> Pacer {
        Pacer {
            normal,
            long,
            settled: Mode::Normal,
            window: None,
            trial: Vec::new(),
            trial_at: now,
            retry: RETRY_FIRST,
            long_rate: 0.0,
        }
    }

    /// The mode the pauses follow now.
    pub fn mode(&self) -> Mode {
        self.window.map_or(self.settled, |w| w.mode)
    }

    /// A round whose snapshot was taken at `started` applied `changes` changes: the pause
    /// before the next, and the pacer's decision if this round ended a trial or the longer pause.
    pub fn after_round(&mut self, started: Instant, changes: u64) -> (Duration, Option<Decision>) {
        let light = changes <= LIGHT_ROUND_CHANGES;
        if self.normal.is_zero() || self.long <= self.normal || (light && self.mode() == Mode::Long)
        {
            // Nothing to try, or the load fell under the longer pause: no trial, no longer
            // pause.
            self.window = None;
            self.trial.clear();
            self.retry = RETRY_FIRST;
            let fell = self.settle(Mode::Normal, None);
            return (round_pause(changes, self.normal), fell);
        }
        let (next, settled) = match &mut self.window {
            // Opens a window at this round's snapshot: the next round's changes are its first.
            None => (self.settled, None),
            Some(w) => {
                w.changes += changes;
                w.rounds += 1;
                w.paced += u32::from(!light);
                let (mode, elapsed) = (w.mode, started.saturating_duration_since(w.start));
                if elapsed < WINDOW {
                    return (self.pause(mode, changes), None);
                }
                let rate = w.changes as f64 / elapsed.as_secs_f64();
                let saturated = f64::from(w.paced) >= SATURATED_SHARE * f64::from(w.rounds);
                self.window_done(started, mode, rate, saturated)
            }
        };
        self.window = Some(Window {
            mode: next,
            start: started,
            changes: 0,
            rounds: 0,
            paced: 0,
        });
        (self.pause(next, changes), settled)
    }

    fn pause(&self, mode: Mode, changes: u64) -> Duration {
        match mode {
            Mode::Normal => round_pause(changes, self.normal),
            Mode::Long => self.long,
        }
    }

    /// A window under `mode` measured `rate`, and whether nearly all its rounds were paced:
    /// the mode of the next window, and the decision when it ended a trial or the longer pause.
    fn window_done(
        &mut self,
        now: Instant,
        mode: Mode,
        rate: f64,
        saturated: bool,
    ) -> (Mode, Option<Decision>) {
        if self.trial.is_empty() {
            if mode == Mode::Normal && !saturated {
                // The source let up: a later trial starts afresh.
                self.retry = RETRY_FIRST;
                return (Mode::Normal, None);
            }
            if now < self.trial_at {
                if self.settled == Mode::Long && rate < FALL * self.long_rate {
                    self.retry = RETRY_FIRST;
                    self.trial_at = now + RETRY_FIRST;
                    return (Mode::Normal, self.settle(Mode::Normal, None));
                }
                return (self.settled, None);
            }
            if mode == Mode::Normal {
                // Nearly every round of a whole window was paced: the longer pause starts now,
                // and the trial (longer, normal, longer) decides whether it stays.
                return (Mode::Long, None);
            }
        }
        self.trial.push(rate);
        if self.trial.len() < 3 {
            return (mode.other(), None);
        }
        // Longer, normal, longer: the mean of the two longer windows against the one between
        // them, so that a load drifting steadily up or down favours neither.
        let long = (self.trial[0] + self.trial[2]) / 2.0;
        let normal = self.trial[1];
        self.trial.clear();
        let pays = long >= normal * (1.0 + GAIN);
        if pays {
            self.long_rate = long;
            self.trial_at = now + HOLD;
        } else {
            self.trial_at = now + self.retry;
            self.retry = (self.retry * 2).min(RETRY_CAP);
        }
        let mode = if pays { Mode::Long } else { Mode::Normal };
        (mode, self.settle(mode, Some((long, normal))))
    }

    /// Settles on `mode`: a decision to report when a trial decided or the mode changed.
    fn settle(&mut self, mode: Mode, rates: Option<(f64, f64)>) -> Option<Decision> {
        let changed = self.settled != mode;
        self.settled = mode;
        (changed || rates.is_some()).then_some(Decision {
            mode,
            changed,
            rates,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_millis(50);
    const LONG: Duration = Duration::from_millis(200);

    #[test]
    fn light_rounds_start_the_next_at_once() {
        for changes in [0, 1, LIGHT_ROUND_CHANGES] {
            assert_eq!(round_pause(changes, MAX), Duration::ZERO, "{changes}");
        }
    }

    #[test]
    fn the_pause_grows_with_the_round_up_to_the_cap() {
        let pauses: Vec<Duration> = [51, 80, 100, 150, 250, 251, 10_000, u64::MAX]
            .iter()
            .map(|&c| round_pause(c, Duration::from_millis(20)))
            .collect();
        assert_eq!(pauses[0], PAUSE_PER_CHANGE);
        assert_eq!(pauses[1], Duration::from_millis(3));
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]), "{pauses:?}");
        assert_eq!(pauses[4], Duration::from_millis(20));
        assert!(
            pauses[4..].iter().all(|p| *p == Duration::from_millis(20)),
            "{pauses:?}"
        );
    }

    #[test]
    fn no_cap_means_no_pacing() {
        let mut pacer = Pacer::new(Duration::ZERO, LONG, Instant::now());
        for changes in [0, 51, 1_000, u64::MAX] {
            assert_eq!(round_pause(changes, Duration::ZERO), Duration::ZERO);
            assert_eq!(pacer.after_round(Instant::now(), changes).0, Duration::ZERO);
        }
    }

    /// Drives a pacer with rounds every 20 ms plus the pause it asks for, for `span`, the
    /// source writing `rate(mode)` changes per second: its changes of mode, and the time spent
    /// under the longer pause.
    fn drive(
        pacer: &mut Pacer,
        now: &mut Instant,
        span: Duration,
        rate: impl Fn(Mode) -> f64,
    ) -> (Vec<Decision>, Duration) {
        let end = *now + span;
        let (mut changed, mut long) = (Vec::new(), Duration::ZERO);
        let mut pause = Duration::ZERO;
        while *now < end {
            let gap = Duration::from_millis(20) + pause;
            let mode = pacer.mode();
            if mode == Mode::Long {
                long += gap;
            }
            *now += gap;
            let changes = (rate(mode) * gap.as_secs_f64()) as u64;
            let (p, d) = pacer.after_round(*now, changes);
            pause = p;
            changed.extend(d.filter(|d| d.changed));
        }
        (changed, long)
    }

    /// A saturated source: it commits more while the rounds wait longer.
    fn saturated(mode: Mode) -> f64 {
        match mode {
            Mode::Long => 9_000.0,
            Mode::Normal => 8_000.0,
        }
    }

    #[test]
    fn a_longer_pause_is_kept_when_the_source_commits_more_under_it() {
        let mut now = Instant::now();
        let mut pacer = Pacer::new(MAX, LONG, now);
        let (changed, _) = drive(&mut pacer, &mut now, Duration::from_secs(15), saturated);
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert_eq!(changed[0].mode, Mode::Long);
        assert_eq!(pacer.mode(), Mode::Long);
        // Checked again after HOLD, and kept.
        let (changed, _) = drive(&mut pacer, &mut now, HOLD * 2, saturated);
        assert!(changed.is_empty(), "{changed:?}");
        assert_eq!(pacer.mode(), Mode::Long);
    }

    #[test]
    fn a_longer_pause_that_does_not_raise_the_rate_is_not_kept() {
        let mut now = Instant::now();
        let mut pacer = Pacer::new(MAX, LONG, now);
        let (changed, long) = drive(&mut pacer, &mut now, Duration::from_secs(60), |_| 9_000.0);
        assert!(changed.is_empty(), "{changed:?}");
        // Tried after the first window, then 10 s and 20 s after each failed trial: at most 5
        // windows of 3 s under the longer pause in the first minute.
        assert!(
            long <= WINDOW * 5 + LONG * 5,
            "{long:?} under the longer pause"
        );
    }

    #[test]
    fn light_rounds_never_get_the_longer_pause() {
        let mut now = Instant::now();
        let mut pacer = Pacer::new(MAX, LONG, now);
        // 1,000 transactions/s: rounds of about 40 changes, now and then a larger one.
        for i in 0..5_000u64 {
            now += Duration::from_millis(8);
            let changes = if i % 7 == 0 { 120 } else { 40 };
            let (pause, _) = pacer.after_round(now, changes);
            assert!(pause <= MAX);
            assert_eq!(pacer.mode(), Mode::Normal);
        }
    }

    #[test]
    fn a_light_round_now_and_then_does_not_keep_a_saturated_source_from_the_longer_pause() {
        let mut now = Instant::now();
        let mut pacer = Pacer::new(MAX, LONG, now);
        let mut pause = Duration::ZERO;
        let mut decided = Vec::new();
        // Saturated, but one round in ten comes out light (and one under the longer pause too
        // would end it: those stay paced here, as under a longer pause they are).
        for i in 0..2_000u64 {
            let gap = Duration::from_millis(20) + pause;
            now += gap;
            let mode = pacer.mode();
            let light = mode == Mode::Normal && i % 10 == 0;
            let changes = if light {
                LIGHT_ROUND_CHANGES
            } else {
                (saturated(mode) * gap.as_secs_f64()) as u64
            };
            let (p, d) = pacer.after_round(now, changes);
            pause = p;
            decided.extend(d);
            if pacer.mode() == Mode::Long && decided.iter().any(|d| d.changed) {
                break;
            }
        }
        assert_eq!(decided.len(), 1, "{decided:?}");
        assert_eq!(decided[0].mode, Mode::Long);
        assert_eq!(pacer.mode(), Mode::Long);
    }

    #[test]
    fn the_longer_pause_ends_when_the_load_falls() {
        let mut now = Instant::now();
        let mut pacer = Pacer::new(MAX, LONG, now);
        drive(&mut pacer, &mut now, Duration::from_secs(15), saturated);
        assert_eq!(pacer.mode(), Mode::Long);
        // Half the rate, still every round paced: the next window ends it.
        let (changed, _) = drive(&mut pacer, &mut now, Duration::from_secs(5), |_| 4_000.0);
        assert_eq!(changed.first().map(|d| d.mode), Some(Mode::Normal));
        assert_eq!(pacer.mode(), Mode::Normal);
        // A light round ends it at once.
        let mut pacer = Pacer::new(MAX, LONG, now);
        drive(&mut pacer, &mut now, Duration::from_secs(15), saturated);
        assert_eq!(pacer.mode(), Mode::Long);
        now += Duration::from_millis(200);
        let (pause, decision) = pacer.after_round(now, 10);
        assert_eq!(pause, Duration::ZERO);
        assert_eq!(decision.map(|d| d.mode), Some(Mode::Normal));
    }
}
