//! Token buckets for the routes that cost a password hash (register and log
//! in): per client IP, and per account name for log-in. A refused request
//! gets 429 with `Retry-After`. The tables are bounded: idle buckets (full
//! again) are dropped, and when a flood of distinct keys still fills a table
//! the newcomers are refused rather than growing memory without end.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many requests a key may make at once, and how fast it earns more.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub burst: u32,
    pub per_minute: u32,
}

impl Rate {
    fn per_second(&self) -> f64 {
        f64::from(self.per_minute.max(1)) / 60.0
    }
}

/// The limits of the auth routes; `None` turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AuthLimits {
    /// register and log-in together, per client IP.
    pub per_ip: Option<Rate>,
    /// log-in, per account name (a password-guessing limit whatever the IP).
    pub per_account: Option<Rate>,
}

impl Default for AuthLimits {
    fn default() -> Self {
        AuthLimits {
            per_ip: Some(Rate {
                burst: 30,
                per_minute: 30,
            }),
            per_account: Some(Rate {
                burst: 10,
                per_minute: 10,
            }),
        }
    }
}

impl AuthLimits {
    pub const OFF: AuthLimits = AuthLimits {
        per_ip: None,
        per_account: None,
    };
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// One table of buckets.
pub struct Limiter<K> {
    rate: Rate,
    max_keys: usize,
    buckets: Mutex<HashMap<K, Bucket>>,
}

/// Keys one table holds at most (a few MiB at worst).
pub const MAX_KEYS: usize = 65_536;

impl<K: Eq + Hash + Clone> Limiter<K> {
    pub fn new(rate: Rate, max_keys: usize) -> Limiter<K> {
        Limiter {
            rate,
            max_keys,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key`, or says how long until one is there.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let rate = self.rate.per_second();
        let burst = f64::from(self.rate.burst.max(1));
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !buckets.contains_key(key) && buckets.len() >= self.max_keys {
            // Drop the buckets that have refilled: they hold no history.
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
            if buckets.len() >= self.max_keys {
                return Err(Duration::from_secs(1));
            }
        }
        let b = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }

    pub fn len(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: Rate = Rate {
        burst: 3,
        per_minute: 60,
    };

    #[test]
    fn burst_then_refill() {
        let l = Limiter::new(RATE, 10);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check_at(&"a", t0).is_ok());
        }
        let wait = l.check_at(&"a", t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Another key is not affected.
        assert!(l.check_at(&"b", t0).is_ok());
        // One token a second comes back.
        assert!(l.check_at(&"a", t0 + Duration::from_millis(1010)).is_ok());
        assert!(l.check_at(&"a", t0 + Duration::from_millis(1020)).is_err());
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_keys() {
        let l = Limiter::new(RATE, 100);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let _ = l.check_at(&i, t0);
        }
        assert!(l.len() <= 100, "{}", l.len());
        // Once the early keys refilled, newcomers get room again.
        assert!(l.check_at(&20_000, t0 + Duration::from_secs(5)).is_ok());
        assert!(l.len() <= 100);
    }
}
