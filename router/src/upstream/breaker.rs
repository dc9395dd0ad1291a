//! A circuit breaker per upstream: after a run of failed attempts the upstream is skipped at
//! once for a cooldown, so requests fail over without waiting on its timeouts; then one probe
//! is let through, whose outcome closes or re-opens the circuit.
//!
//! The clock is passed in (`now`), so the state machine is tested without sleeping.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Where a breaker stands; the value is the `cascade_upstream_circuit_state` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls go through.
    Closed,
    /// Calls are refused until the cooldown has passed.
    Open,
    /// One probe is in flight; other calls are refused until it reports.
    HalfOpen,
}

impl CircuitState {
    /// The gauge value: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::Open => 1,
            CircuitState::HalfOpen => 2,
        }
    }
}

/// The breaker of one upstream.
#[derive(Debug)]
pub struct Breaker {
    failures: u32,
    cooldown: Duration,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: CircuitState,
    consecutive: u32,
    opened_at: Option<Instant>,
}

/// The right to make one attempt. Report its outcome with [`Permit::success`] or
/// [`Permit::failure`]; a permit dropped unreported (a budget refusal, a client that went
/// away) says nothing about the upstream, and a probe's slot is handed back.
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    reported: bool,
}

impl Breaker {
    /// A closed breaker that opens after `failures` consecutive failures for `cooldown`.
    pub fn new(failures: u32, cooldown: Duration) -> Self {
        Self {
            failures: failures.max(1),
            cooldown,
            inner: Mutex::new(Inner {
                state: CircuitState::Closed,
                consecutive: 0,
                opened_at: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state is a few plain fields, valid after any panic elsewhere.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state as last recorded (an open breaker whose cooldown passed stays open until a
    /// call takes the probe).
    pub fn state(&self) -> CircuitState {
        self.lock().state
    }

    /// Asks to make an attempt now: a permit, or how long until a probe may go.
    pub fn admit(&self, now: Instant) -> Result<Permit<'_>, Duration> {
        let mut inner = self.lock();
        match inner.state {
            CircuitState::Closed => Ok(Permit {
                breaker: self,
                probe: false,
                reported: false,
            }),
            CircuitState::Open => {
                let opened = inner.opened_at.unwrap_or(now);
                let waited = now.saturating_duration_since(opened);
                if waited >= self.cooldown {
                    inner.state = CircuitState::HalfOpen;
                    Ok(Permit {
                        breaker: self,
                        probe: true,
                        reported: false,
                    })
                } else {
                    Err(self.cooldown - waited)
                }
            }
            // The probe's outcome decides; until then nobody else waits on this upstream.
            CircuitState::HalfOpen => Err(Duration::ZERO),
        }
    }

    fn record_success(&self) {
        let mut inner = self.lock();
        inner.state = CircuitState::Closed;
        inner.consecutive = 0;
        inner.opened_at = None;
    }

    fn record_failure(&self, now: Instant, probe: bool) {
        let mut inner = self.lock();
        inner.consecutive = inner.consecutive.saturating_add(1);
        if probe || inner.consecutive >= self.failures {
            inner.state = CircuitState::Open;
            inner.opened_at = Some(now);
        }
    }

    fn abandon_probe(&self) {
        let mut inner = self.lock();
        if inner.state == CircuitState::HalfOpen {
            // Back to open with the cooldown already over: the next call probes.
            inner.state = CircuitState::Open;
        }
    }
}

impl Permit<'_> {
    /// The attempt got an answer: the circuit closes.
    pub fn success(mut self) {
        self.reported = true;
        self.breaker.record_success();
    }

    /// The attempt failed at `now`: one more in the run, or (a probe) open again.
    pub fn failure(mut self, now: Instant) {
        self.reported = true;
        self.breaker.record_failure(now, self.probe);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.reported && self.probe {
            self.breaker.abandon_probe();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    const COOLDOWN: Duration = Duration::from_secs(10);

    fn fail(b: &Breaker, now: Instant) {
        b.admit(now).unwrap().failure(now);
    }

    #[test]
    fn opens_after_the_configured_run_of_failures_and_a_success_resets_the_run() {
        let b = Breaker::new(3, COOLDOWN);
        let t = Instant::now();
        fail(&b, t);
        fail(&b, t);
        b.admit(t).unwrap().success();
        fail(&b, t);
        fail(&b, t);
        assert_eq!(b.state(), CircuitState::Closed, "the success reset the run");
        fail(&b, t);
        assert_eq!(b.state(), CircuitState::Open);
        let wait = b.admit(t + Duration::from_secs(4)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(6));
    }

    #[test]
    fn after_the_cooldown_one_probe_goes_and_its_success_closes_the_circuit() {
        let b = Breaker::new(1, COOLDOWN);
        let t = Instant::now();
        fail(&b, t);
        let later = t + COOLDOWN;
        let probe = b.admit(later).unwrap();
        assert_eq!(b.state(), CircuitState::HalfOpen);
        assert!(b.admit(later).is_err(), "only one probe at a time");
        probe.success();
        assert_eq!(b.state(), CircuitState::Closed);
        assert!(b.admit(later).is_ok());
    }

    #[test]
    fn a_failed_probe_reopens_for_a_full_cooldown() {
        let b = Breaker::new(5, COOLDOWN);
        let t = Instant::now();
        for _ in 0..5 {
            fail(&b, t);
        }
        let probe_at = t + COOLDOWN + Duration::from_secs(1);
        b.admit(probe_at).unwrap().failure(probe_at);
        assert_eq!(b.state(), CircuitState::Open);
        assert!(b
            .admit(probe_at + COOLDOWN - Duration::from_millis(1))
            .is_err());
        assert!(b.admit(probe_at + COOLDOWN).is_ok());
    }

    #[test]
    fn an_unreported_probe_hands_its_slot_back() {
        let b = Breaker::new(1, COOLDOWN);
        let t = Instant::now();
        fail(&b, t);
        drop(b.admit(t + COOLDOWN).unwrap());
        assert_eq!(b.state(), CircuitState::Open);
        assert!(
            b.admit(t + COOLDOWN).is_ok(),
            "the next call may probe at once"
        );
    }

    #[test]
    fn gauge_values_follow_the_metric_contract() {
        assert_eq!(CircuitState::Closed.gauge(), 0);
        assert_eq!(CircuitState::Open.gauge(), 1);
        assert_eq!(CircuitState::HalfOpen.gauge(), 2);
    }
}
