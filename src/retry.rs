//! When to try again: exponential backoff with full jitter, bounded by a number
//! of attempts and an age, where `Retry-After` may only push an attempt later.
//!
//! [`RetryPolicy`] is a validated value: built once by [`RetryPolicy::new`],
//! it cannot hold a zero base, a factor below one or a cap below the base.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    base: Duration,
    factor: f64,
    cap: Duration,
    max_attempts: u32,
    max_age: Duration,
    retry_after_cap: Duration,
}

/// What to do after a failed attempt that may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try again after this delay.
    After(Duration),
    /// Attempts or age are used up: dead-letter it.
    Exhausted,
}

impl Default for RetryPolicy {
    /// 5 s doubling to a 2 h cap, up to 30 attempts within 24 h: with full
    /// jitter the schedule spans most of a day before a delivery is given up.
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_secs(5),
            factor: 2.0,
            cap: Duration::from_secs(2 * 3600),
            max_attempts: 30,
            max_age: Duration::from_secs(24 * 3600),
            retry_after_cap: Duration::from_secs(3600),
        }
    }
}

impl RetryPolicy {
    /// Checks the parts; on error names the offending key and why.
    pub fn new(
        base: Duration,
        factor: f64,
        cap: Duration,
        max_attempts: u32,
        max_age: Duration,
        retry_after_cap: Duration,
    ) -> Result<Self, (&'static str, String)> {
        if base.is_zero() {
            return Err(("base", "must be greater than zero".into()));
        }
        if !(factor.is_finite() && factor >= 1.0) {
            return Err(("factor", format!("must be a finite number ≥ 1, found {factor}")));
        }
        if cap < base {
            return Err(("cap", format!("must be at least retry.base ({base:?}), found {cap:?}")));
        }
        if max_attempts == 0 {
            return Err(("max_attempts", "must be at least 1".into()));
        }
        if max_age.is_zero() {
            return Err(("max_age", "must be greater than zero".into()));
        }
        Ok(RetryPolicy { base, factor, cap, max_attempts, max_age, retry_after_cap })
    }

    pub fn base(&self) -> Duration {
        self.base
    }
    pub fn factor(&self) -> f64 {
        self.factor
    }
    pub fn cap(&self) -> Duration {
        self.cap
    }
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }
    pub fn max_age(&self) -> Duration {
        self.max_age
    }
    pub fn retry_after_cap(&self) -> Duration {
        self.retry_after_cap
    }

    /// The ceiling of the jitter window after `attempts` failed attempts:
    /// `min(cap, base × factor^(attempts-1))`.
    pub fn ceiling(&self, attempts: u32) -> Duration {
        let exp = self.factor.powi(attempts.saturating_sub(1).min(1000) as i32);
        let secs = self.base.as_secs_f64() * exp;
        if !secs.is_finite() || secs >= self.cap.as_secs_f64() { self.cap } else { Duration::from_secs_f64(secs) }
    }

    /// Decides the next step after `attempts` failed attempts, the first of
    /// which started `age` ago. `retry_after` is the receiver's request, which
    /// is capped and can only lengthen the delay. `unit` is a uniform sample
    /// in [0, 1) for the full jitter (tests pass fixed values).
    pub fn decide(&self, attempts: u32, age: Duration, retry_after: Option<Duration>, unit: f64) -> RetryDecision {
        if attempts >= self.max_attempts {
            return RetryDecision::Exhausted;
        }
        let jittered = self.ceiling(attempts).mul_f64(unit.clamp(0.0, 1.0));
        let delay = match retry_after {
            Some(asked) => jittered.max(asked.min(self.retry_after_cap)),
            None => jittered,
        };
        if age + delay > self.max_age {
            return RetryDecision::Exhausted;
        }
        RetryDecision::After(delay)
    }

    /// [`decide`](Self::decide) with a random jitter sample.
    pub fn decide_now(&self, attempts: u32, age: Duration, retry_after: Option<Duration>) -> RetryDecision {
        self.decide(attempts, age, retry_after, rand::rng().random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy::new(
            Duration::from_secs(1),
            2.0,
            Duration::from_secs(60),
            5,
            Duration::from_secs(3600),
            Duration::from_secs(300),
        )
        .expect("valid")
    }

    #[test]
    fn ceiling_grows_exponentially_up_to_the_cap() {
        let p = policy();
        let secs: Vec<u64> = (1..=8).map(|a| p.ceiling(a).as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        let p = policy();
        assert_eq!(p.decide(3, Duration::ZERO, None, 0.0), RetryDecision::After(Duration::ZERO));
        assert_eq!(p.decide(3, Duration::ZERO, None, 0.5), RetryDecision::After(Duration::from_secs(2)));
        for _ in 0..1000 {
            match p.decide_now(4, Duration::ZERO, None) {
                RetryDecision::After(d) => assert!(d <= Duration::from_secs(8)),
                RetryDecision::Exhausted => panic!("not exhausted yet"),
            }
        }
    }

    #[test]
    fn retry_after_only_pushes_later_and_is_capped() {
        let p = policy();
        // asked for less than the backoff: backoff wins
        assert_eq!(
            p.decide(3, Duration::ZERO, Some(Duration::from_secs(1)), 0.99),
            RetryDecision::After(Duration::from_secs(4).mul_f64(0.99))
        );
        // asked for more: honoured
        assert_eq!(
            p.decide(1, Duration::ZERO, Some(Duration::from_secs(30)), 0.5),
            RetryDecision::After(Duration::from_secs(30))
        );
        // asked for too much: capped
        assert_eq!(
            p.decide(1, Duration::ZERO, Some(Duration::from_secs(100_000)), 0.5),
            RetryDecision::After(Duration::from_secs(300))
        );
    }

    #[test]
    fn attempts_and_age_are_bounded() {
        let p = policy();
        assert_eq!(p.decide(5, Duration::ZERO, None, 0.1), RetryDecision::Exhausted);
        assert!(matches!(p.decide(4, Duration::ZERO, None, 0.1), RetryDecision::After(_)));
        assert_eq!(p.decide(1, Duration::from_secs(3600), None, 0.5), RetryDecision::Exhausted);
        assert_eq!(
            p.decide(1, Duration::from_secs(3500), Some(Duration::from_secs(200)), 0.5),
            RetryDecision::Exhausted
        );
    }

    #[test]
    fn invalid_parts_are_named() {
        let d = Duration::from_secs(1);
        assert_eq!(RetryPolicy::new(Duration::ZERO, 2.0, d, 1, d, d).expect_err("invalid").0, "base");
        assert_eq!(RetryPolicy::new(d, 0.5, d, 1, d, d).expect_err("invalid").0, "factor");
        assert_eq!(RetryPolicy::new(d, f64::NAN, d, 1, d, d).expect_err("invalid").0, "factor");
        assert_eq!(RetryPolicy::new(d * 2, 2.0, d, 1, d, d).expect_err("invalid").0, "cap");
        assert_eq!(RetryPolicy::new(d, 2.0, d, 0, d, d).expect_err("invalid").0, "max_attempts");
        assert_eq!(RetryPolicy::new(d, 2.0, d, 1, Duration::ZERO, d).expect_err("invalid").0, "max_age");
    }

    #[test]
    fn default_schedule_spans_about_a_day() {
        let p = RetryPolicy::default();
        let total_ceiling: Duration = (1..p.max_attempts()).map(|a| p.ceiling(a)).sum();
        // The expected total with full jitter is half the sum of the ceilings.
        assert!(total_ceiling / 2 > Duration::from_secs(12 * 3600), "{total_ceiling:?}");
        assert_eq!(p.max_age(), Duration::from_secs(24 * 3600));
    }
}
