//! A lease's heartbeats, sent from a thread of their own for the lease's whole life:
//! while the worker fetches the base version, trains, encodes and uploads, and while the
//! coordinator scores the upload. Heart-beating only between training steps left a
//! lease unrenewed through everything else, and a slow machine's leases lapsed there
//! (session 24's fine-tune demo: units of 130 to 145 s against a 120 s lease, and no
//! heartbeat at all in 4 versions).

use std::sync::Mutex;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use crate::transport::TransportError;

/// Shortest wait between two heartbeats, whatever the coordinator asks (its
/// `heartbeat_ms` is a third of its lease; a broken or hostile one could ask for 1 ms).
pub(crate) const HEARTBEAT_MIN: Duration = Duration::from_secs(1);

/// Most unread heartbeat failures kept for the reporter; later ones are counted only.
pub(crate) const FAILURES_KEPT_MAX: usize = 8;

/// What the heartbeat thread has seen, read by the worker between its stages.
#[derive(Debug, Default)]
pub(crate) struct Heartbeats {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The coordinator's sentence when it answered that the unit is no longer leased
    /// to this worker (`not_leased`): the heartbeats stop there.
    withdrawn: Option<String>,
    /// Failures not yet reported (a missed heartbeat is not fatal: the lease has slack),
    /// and the coordinator's word that the lease expired (once).
    failures: Vec<String>,
    /// Failures past [`FAILURES_KEPT_MAX`] not yet reported.
    dropped: u64,
    /// The coordinator answered `lease_expired`: the lease ended by time and the unit is
    /// queued for anyone, but its update is still taken until someone else is leased it,
    /// so the work goes on (and the heartbeats, to hear if it is taken).
    expired: bool,
    /// Heartbeats the coordinator answered with a renewal.
    renewed: u64,
}

impl Heartbeats {
    /// The coordinator's sentence if it withdrew the unit.
    pub(crate) fn withdrawn(&self) -> Option<String> {
        self.lock().withdrawn.clone()
    }

    /// Heartbeats renewed so far.
    pub(crate) fn renewed(&self) -> u64 {
        self.lock().renewed
    }

    /// The failures not yet reported, as sentences, and forgets them.
    pub(crate) fn take_failures(&self) -> Vec<String> {
        let mut state = self.lock();
        let mut out = std::mem::take(&mut state.failures);
        let dropped = std::mem::take(&mut state.dropped);
        if dropped > 0 {
            out.push(format!("{dropped} more heartbeats failed"));
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one heartbeat's answer; false: the unit was withdrawn, stop beating.
    fn record(&self, answer: Result<(), TransportError>) -> bool {
        let mut state = self.lock();
        match answer {
            Ok(()) => state.renewed += 1,
            Err(TransportError::Refused(r)) if r.code == "not_leased" => {
                state.withdrawn = Some(r.message);
                return false;
            }
            Err(TransportError::Refused(r)) if r.code == "lease_expired" => {
                if !std::mem::replace(&mut state.expired, true) {
                    state.failures.push(r.message);
                }
            }
            Err(e) if state.failures.len() < FAILURES_KEPT_MAX => {
                state.failures.push(format!("heartbeat failed: {e}"));
            }
            Err(_) => state.dropped += 1,
        }
        true
    }
}

/// Runs `body` while a scoped thread calls `beat` every `every` (at least
/// [`HEARTBEAT_MIN`]), the first after one wait, until `body` returns or the coordinator
/// answers `not_leased`. The thread is woken and joined when `body` returns; a heartbeat
/// in flight then is waited for (bounded by the transport's request timeout).
pub(crate) fn while_beating<T>(
    every: Duration,
    beat: impl Fn() -> Result<(), TransportError> + Send,
    body: impl FnOnce(&Heartbeats) -> T,
) -> T {
    let every = every.max(HEARTBEAT_MIN);
    let heartbeats = Heartbeats::default();
    let (done, wait) = mpsc::channel::<()>();
    std::thread::scope(|scope| {
        let shared = &heartbeats;
        scope.spawn(move || {
            loop {
                match wait.recv_timeout(every) {
                    Err(RecvTimeoutError::Timeout) => {}
                    // The body returned (the sender is dropped): stop.
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                }
                if !shared.record(beat()) {
                    return;
                }
            }
        });
        let out = body(shared);
        drop(done);
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Refusal;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Instant;

    /// How the coordinator answers the n-th heartbeat.
    fn answer(code: Option<&str>) -> Result<(), TransportError> {
        match code {
            None => Ok(()),
            Some("unreachable") => Err(TransportError::Unreachable {
                url: "http://c".into(),
                message: "refused".into(),
            }),
            Some(code) => Err(TransportError::Refused(Refusal {
                status: 409,
                code: code.into(),
                message: format!("answered {code}"),
            })),
        }
    }

    /// A body that lasts `body_ms` under heartbeats every `HEARTBEAT_MIN`, answered from
    /// `answers` (the last repeats): the heartbeats sent, renewed, the withdrawal and the
    /// failures reported at the end.
    #[track_caller]
    fn check(body_ms: u64, answers: &[Option<&str>], want: (u32, u64, bool, usize)) {
        let sent = AtomicU32::new(0);
        let started = Instant::now();
        let (renewed, withdrawn, failures) = while_beating(
            Duration::ZERO,
            || {
                let n = sent.fetch_add(1, Ordering::SeqCst) as usize;
                answer(answers[n.min(answers.len() - 1)])
            },
            |hb| {
                std::thread::sleep(Duration::from_millis(body_ms));
                (hb.renewed(), hb.withdrawn(), hb.take_failures())
            },
        );
        // Woken at once when the body returns, not after a further wait.
        assert!(
            started.elapsed() < Duration::from_millis(body_ms) + HEARTBEAT_MIN,
            "joined late"
        );
        let got = (
            sent.load(Ordering::SeqCst),
            renewed,
            withdrawn.is_some(),
            failures.len(),
        );
        assert_eq!(got, want, "{body_ms} ms, {answers:?}");
    }

    #[test]
    fn a_lease_is_renewed_for_as_long_as_the_work_lasts_and_no_longer() {
        // Each case waits in real time; they run side by side.
        type Case = (
            u64,
            &'static [Option<&'static str>],
            (u32, u64, bool, usize),
        );
        let cases: [Case; 6] = [
            // Shorter than one wait (the floor, as the coordinator asked for 0): none.
            (300, &[None], (0, 0, false, 0)),
            // 2.5 waits: two heartbeats, both renewals.
            (2_500, &[None], (2, 2, false, 0)),
            // Withdrawn at the first: the thread stops there.
            (2_500, &[Some("not_leased")], (1, 0, true, 0)),
            // A failure is reported and the next heartbeat still goes.
            (2_500, &[Some("unreachable"), None], (2, 1, false, 1)),
            (2_500, &[Some("busy")], (2, 0, false, 2)),
            // Expired but still taken: told once, and the heartbeats go on.
            (2_500, &[Some("lease_expired")], (2, 0, false, 1)),
        ];
        std::thread::scope(|scope| {
            for (body_ms, answers, want) in cases {
                scope.spawn(move || check(body_ms, answers, want));
            }
        });
    }
}
