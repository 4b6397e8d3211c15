//! A device's readings over time: the profile's values at whole, strictly increasing device
//! seconds, so (device, device time) identifies one message in the ack log.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::scenario::profiles::{Generator, Profile, Value};
use crate::scenario::{Scenario, SimDevice};

pub struct Sampler<'a> {
    profile: &'a Profile,
    generator: Generator,
    rng: StdRng,
    last_ts_s: u64,
    interval: Duration,
    utc_offset_hours: f64,
    pub values: Vec<(String, Value)>,
}

impl<'a> Sampler<'a> {
    pub fn new(dev: &SimDevice, scenario: &'a Scenario) -> Self {
        let profile = &scenario.profiles[&dev.profile];
        let mut rng = StdRng::seed_from_u64(dev.seed);
        let generator = Generator::new(profile, &mut rng);
        Self {
            profile,
            generator,
            rng,
            last_ts_s: 0,
            interval: dev.interval,
            utc_offset_hours: scenario.utc_offset_hours,
            values: Vec::new(),
        }
    }

    /// When to report first: a random phase within one interval, so devices do not report in
    /// lockstep.
    pub fn first_report(&mut self) -> Instant {
        Instant::now() + self.interval.mul_f64(self.rng.random::<f64>())
    }

    /// Samples the profile now; returns the device time (Unix seconds), values in `self.values`.
    pub fn sample(&mut self) -> u64 {
        let now_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let ts_s = now_s.max(self.last_ts_s + 1);
        self.last_ts_s = ts_s;
        let hour = ((ts_s as f64 / 3600.0) + self.utc_offset_hours).rem_euclid(24.0);
        self.generator.sample(
            self.profile,
            hour,
            self.interval.as_secs_f64(),
            &mut self.rng,
            &mut self.values,
        );
        ts_s
    }
}
