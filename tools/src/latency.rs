//! Service-time models for stampede-target: the `--latency` syntax (parse and print) and
//! drawing one delay per request. Owns no timers and no shared state; callers sleep.
//!
//! Syntax (also in `--help`):
//! - `0` or `none`: no added delay
//! - `5ms`: fixed delay
//! - `uniform:5ms..20ms`: uniform between the two bounds
//! - `normal:20ms,5ms`: normal with mean 20ms and standard deviation 5ms, cut at 0
//! - `exp:10ms`: exponential with mean 10ms (a long tail)
//!
//! Durations are a number (decimals allowed) and a unit: `us`, `ms`, `s`, `m`.
//! Every sample is capped at [`MAX_SAMPLE`] so a wild distribution cannot park requests forever.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::Rng;

/// Upper bound on any single drawn delay.
pub const MAX_SAMPLE: Duration = Duration::from_secs(60);

/// How long the target waits before answering a request (before the stall knob).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum Latency {
    /// Answer as fast as possible.
    #[default]
    None,
    /// Always the same delay.
    Fixed(Duration),
    /// Uniformly between `min` and `max`.
    Uniform { min: Duration, max: Duration },
    /// Normal distribution, negative draws cut to zero.
    Normal { mean: Duration, stddev: Duration },
    /// Exponential distribution with the given mean.
    Exp { mean: Duration },
}

/// A `--latency` value that does not follow the syntax; the message names the bad part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencyParseError(pub String);

impl fmt::Display for LatencyParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LatencyParseError {}

impl Latency {
    /// True when no delay is ever drawn, so the hot path can skip the clock entirely.
    pub fn is_none(&self) -> bool {
        match *self {
            Latency::None => true,
            Latency::Fixed(d) => d.is_zero(),
            Latency::Uniform { min, max } => min.is_zero() && max.is_zero(),
            Latency::Normal { mean, stddev } => mean.is_zero() && stddev.is_zero(),
            Latency::Exp { mean } => mean.is_zero(),
        }
    }

    /// Draws one delay.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> Duration {
        let d = match *self {
            Latency::None => Duration::ZERO,
            Latency::Fixed(d) => d,
            Latency::Uniform { min, max } => {
                if max <= min {
                    min
                } else {
                    let span = (max - min).as_nanos() as u64;
                    min + Duration::from_nanos(rng.random_range(0..=span))
                }
            }
            Latency::Normal { mean, stddev } => {
                // Box-Muller; u1 in (0, 1] so ln never sees zero.
                let u1: f64 = 1.0 - rng.random::<f64>();
                let u2: f64 = rng.random::<f64>();
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                secs_clamped(mean.as_secs_f64() + z * stddev.as_secs_f64())
            }
            Latency::Exp { mean } => {
                let u: f64 = 1.0 - rng.random::<f64>();
                secs_clamped(-mean.as_secs_f64() * u.ln())
            }
        };
        d.min(MAX_SAMPLE)
    }

    /// Packs into three words so the knob can live in atomics (no lock on the hot path).
    pub(crate) fn to_parts(self) -> (u8, u64, u64) {
        match self {
            Latency::None => (0, 0, 0),
            Latency::Fixed(d) => (1, nanos(d), 0),
            Latency::Uniform { min, max } => (2, nanos(min), nanos(max)),
            Latency::Normal { mean, stddev } => (3, nanos(mean), nanos(stddev)),
            Latency::Exp { mean } => (4, nanos(mean), 0),
        }
    }

    /// Inverse of [`Latency::to_parts`]; an unknown kind reads as no latency.
    pub(crate) fn from_parts(kind: u8, a: u64, b: u64) -> Latency {
        let (a, b) = (Duration::from_nanos(a), Duration::from_nanos(b));
        match kind {
            1 => Latency::Fixed(a),
            2 => Latency::Uniform { min: a, max: b },
            3 => Latency::Normal { mean: a, stddev: b },
            4 => Latency::Exp { mean: a },
            _ => Latency::None,
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn secs_clamped(s: f64) -> Duration {
    if s.is_finite() && s > 0.0 {
        Duration::from_secs_f64(s.min(MAX_SAMPLE.as_secs_f64()))
    } else {
        Duration::ZERO
    }
}

impl FromStr for Latency {
    type Err = LatencyParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() || s == "0" || s.eq_ignore_ascii_case("none") {
            return Ok(Latency::None);
        }
        let Some((kind, args)) = s.split_once(':') else {
            return parse_duration(s)
                .map(Latency::Fixed)
                .map_err(|e| LatencyParseError(format!("latency {s:?}: {e}")));
        };
        let ctx = |e: String| LatencyParseError(format!("latency {s:?}: {e}"));
        match kind.trim().to_ascii_lowercase().as_str() {
            "fixed" => Ok(Latency::Fixed(parse_duration(args).map_err(ctx)?)),
            "uniform" => {
                let (lo, hi) = args
                    .split_once("..")
                    .ok_or_else(|| ctx("uniform needs MIN..MAX, e.g. uniform:5ms..20ms".into()))?;
                let (min, max) = (
                    parse_duration(lo).map_err(ctx)?,
                    parse_duration(hi).map_err(ctx)?,
                );
                if max < min {
                    return Err(ctx("uniform MIN is larger than MAX".into()));
                }
                Ok(Latency::Uniform { min, max })
            }
            "normal" => {
                let (m, sd) = args
                    .split_once(',')
                    .ok_or_else(|| ctx("normal needs MEAN,STDDEV, e.g. normal:20ms,5ms".into()))?;
                Ok(Latency::Normal {
                    mean: parse_duration(m).map_err(ctx)?,
                    stddev: parse_duration(sd).map_err(ctx)?,
                })
            }
            "exp" => Ok(Latency::Exp {
                mean: parse_duration(args).map_err(ctx)?,
            }),
            other => Err(ctx(format!(
                "unknown distribution {other:?} (expected fixed, uniform, normal or exp)"
            ))),
        }
    }
}

impl fmt::Display for Latency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Latency::None => f.write_str("none"),
            Latency::Fixed(d) => write!(f, "{}", FmtDuration(d)),
            Latency::Uniform { min, max } => {
                write!(f, "uniform:{}..{}", FmtDuration(min), FmtDuration(max))
            }
            Latency::Normal { mean, stddev } => {
                write!(f, "normal:{},{}", FmtDuration(mean), FmtDuration(stddev))
            }
            Latency::Exp { mean } => write!(f, "exp:{}", FmtDuration(mean)),
        }
    }
}

/// Prints a duration in the syntax [`parse_duration`] reads, exactly (protocol's format).
pub struct FmtDuration(pub Duration);

impl fmt::Display for FmtDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&stampede_protocol::duration::format_duration(self.0))
    }
}

/// The longest delay a knob takes: a target that sleeps longer is a hung target.
const MAX_KNOB_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Reads a duration with the plan's parser (`500ms`, `1.5s`, `250us`, `2m`, `0`), at most
/// 24h. The error says what was wrong.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = stampede_protocol::duration::parse_duration(s)?;
    if d > MAX_KNOB_DURATION {
        return Err(format!("duration {:?} is out of range (max 24h)", s.trim()));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn parses_every_form_and_prints_it_back() {
        for s in [
            "5ms",
            "uniform:5ms..20ms",
            "normal:20ms,5ms",
            "exp:10ms",
            "none",
            "250us",
            "2s",
        ] {
            let l: Latency = s.parse().unwrap();
            assert_eq!(l.to_string(), s);
            assert_eq!(l.to_string().parse::<Latency>().unwrap(), l);
        }
        assert_eq!(
            "1.5ms".parse::<Latency>().unwrap(),
            Latency::Fixed(Duration::from_micros(1500))
        );
        assert_eq!("0".parse::<Latency>().unwrap(), Latency::None);
        assert_eq!(
            "fixed:3ms".parse::<Latency>().unwrap(),
            Latency::Fixed(Duration::from_millis(3))
        );
    }

    #[test]
    fn rejects_bad_syntax_with_a_named_reason() {
        for (s, needle) in [
            ("5", "no unit"),
            ("5parsecs", "unknown unit"),
            ("gauss:5ms", "unknown distribution"),
            ("normal:5ms", "MEAN,STDDEV"),
            ("uniform:9ms..2ms", "larger than MAX"),
            ("ms", "number"),
        ] {
            let e = s.parse::<Latency>().unwrap_err();
            assert!(e.0.contains(needle), "{s}: {e}");
            assert!(e.0.contains(s), "{s}: error does not name the input: {e}");
        }
    }

    #[test]
    fn samples_stay_in_range_and_have_the_right_mean() {
        let mut rng = SmallRng::seed_from_u64(7);
        let n = 20_000u32;
        let mean = |l: Latency, rng: &mut SmallRng| {
            (0..n).map(|_| l.sample(rng).as_secs_f64()).sum::<f64>() / f64::from(n)
        };
        let u = Latency::Uniform {
            min: Duration::from_millis(5),
            max: Duration::from_millis(15),
        };
        for _ in 0..1000 {
            let d = u.sample(&mut rng);
            assert!(d >= Duration::from_millis(5) && d <= Duration::from_millis(15));
        }
        let m = mean(
            Latency::Exp {
                mean: Duration::from_millis(10),
            },
            &mut rng,
        );
        assert!((0.009..0.011).contains(&m), "exp mean {m}");
        let m = mean(
            Latency::Normal {
                mean: Duration::from_millis(20),
                stddev: Duration::from_millis(2),
            },
            &mut rng,
        );
        assert!((0.0195..0.0205).contains(&m), "normal mean {m}");
    }

    #[test]
    fn parts_round_trip() {
        for l in [
            Latency::None,
            Latency::Fixed(Duration::from_millis(3)),
            Latency::Exp {
                mean: Duration::from_micros(7),
            },
            Latency::Normal {
                mean: Duration::from_millis(1),
                stddev: Duration::from_millis(2),
            },
            Latency::Uniform {
                min: Duration::from_millis(1),
                max: Duration::from_millis(2),
            },
        ] {
            let (k, a, b) = l.to_parts();
            assert_eq!(Latency::from_parts(k, a, b), l);
        }
    }
}
