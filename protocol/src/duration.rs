//! Human durations as plans write them (`500ms`, `10s`, `4m`, `1h30m`, `1.5s`).
//!
//! Owns parsing and exact formatting of durations, plus a serde adapter so plan and
//! executor structs can carry durations as these strings. It must stay pure: no clock,
//! no I/O. Parsing is exact to the nanosecond (no floats), so `format_duration` and
//! `parse_duration` round-trip.

use std::time::Duration;

const NANOS_PER: [(&str, u128); 8] = [
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
    ("d", 86_400_000_000_000),
];

/// The longest duration a plan may give anywhere (a scenario's length, `start_after`,
/// `graceful_stop`, a timeout, a think time), and the longest a scenario may last from
/// the run's start: a load test of a month is already unusual, and the bound keeps
/// every sum of plan durations far from overflowing an `Instant`.
pub const MAX_PLAN_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// `d`, or an error saying it is over [`MAX_PLAN_DURATION`].
pub fn check_plan_duration(d: Duration) -> Result<Duration, String> {
    if d > MAX_PLAN_DURATION {
        Err(format!(
            "{} is longer than the limit of {}",
            format_duration(d),
            format_duration(MAX_PLAN_DURATION)
        ))
    } else {
        Ok(d)
    }
}

/// Parses a duration such as `500ms`, `10s`, `4m`, `1h30m`, `1m30s`, `0s`, `1.5s`.
///
/// Units: `ns`, `us` (or `µs`), `ms`, `s`, `m`, `h`, `d`. Components may repeat in any
/// order and are added up; a bare `0` is accepted. Fractions are exact to the nanosecond;
/// finer digits are an error rather than silently dropped.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    if text.is_empty() {
        return Err("empty duration; expected something like \"10s\" or \"1m30s\"".into());
    }
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total: u128 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = &rest[..num_len];
        if number.is_empty() {
            return Err(format!(
                "invalid duration {text:?}: expected a number at {rest:?}"
            ));
        }
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let per = NANOS_PER
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, n)| *n)
            .ok_or_else(|| {
                if unit.is_empty() {
                    format!("invalid duration {text:?}: {number:?} has no unit (use ns, us, ms, s, m, h or d)")
                } else {
                    format!("invalid duration {text:?}: unknown unit {unit:?} (use ns, us, ms, s, m, h or d)")
                }
            })?;
        let nanos = component_nanos(number, per)
            .map_err(|why| format!("invalid duration {text:?}: {why}"))?;
        total = total
            .checked_add(nanos)
            .ok_or_else(|| format!("duration {text:?} is too long"))?;
    }
    let secs = u64::try_from(total / 1_000_000_000)
        .map_err(|_| format!("duration {text:?} is too long"))?;
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}

/// Nanoseconds of one `NUMBER UNIT` component, exactly.
fn component_nanos(number: &str, per: u128) -> Result<u128, String> {
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if frac_part.contains('.') || (int_part.is_empty() && frac_part.is_empty()) {
        return Err(format!("{number:?} is not a number"));
    }
    let too_long = || format!("{number:?} is too large");
    let int: u128 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| too_long())?
    };
    let mut nanos = int.checked_mul(per).ok_or_else(too_long)?;
    let mut scale = per;
    for digit in frac_part.chars() {
        let d = u128::from(digit.to_digit(10).unwrap_or(0));
        if scale / 10 * 10 != scale {
            return Err(format!(
                "{number:?} is finer than a nanosecond; use fewer decimals"
            ));
        }
        scale /= 10;
        nanos = nanos.checked_add(d * scale).ok_or_else(too_long)?;
    }
    Ok(nanos)
}

/// Formats a duration exactly in the same syntax `parse_duration` reads, largest units
/// first: `1h30m`, `1s500ms`, `250us`, `0s`.
pub fn format_duration(d: Duration) -> String {
    let mut nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, per) in [
        ("h", 3_600_000_000_000u128),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
        ("ns", 1),
    ] {
        let count = nanos / per;
        if count > 0 {
            out.push_str(&count.to_string());
            out.push_str(unit);
            nanos %= per;
        }
    }
    out
}

/// Serde adapter: `#[serde(with = "crate::duration::human")]` writes a `Duration` as its
/// human string and reads either that string or an integer number of seconds.
pub mod human {
    use super::{format_duration, parse_duration};
    use serde::{de, Deserializer, Serializer};
    use std::fmt;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(HumanVisitor)
    }

    struct HumanVisitor;

    impl de::Visitor<'_> for HumanVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a duration such as \"10s\", \"500ms\" or \"1h30m\"")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            parse_duration(v).map_err(E::custom)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(v))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            u64::try_from(v)
                .map(Duration::from_secs)
                .map_err(|_| E::custom(format!("negative duration {v}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_plan_examples() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("500ms"), Ok(ms(500)));
        assert_eq!(parse_duration("10s"), Ok(ms(10_000)));
        assert_eq!(parse_duration("4m"), Ok(ms(240_000)));
        assert_eq!(parse_duration("1h30m"), Ok(ms(5_400_000)));
        assert_eq!(parse_duration("1m30s"), Ok(ms(90_000)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1.5s"), Ok(ms(1_500)));
        assert_eq!(parse_duration(".25s"), Ok(ms(250)));
        assert_eq!(parse_duration(" 2h "), Ok(ms(7_200_000)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("250µs"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(parse_duration("1d"), Ok(ms(86_400_000)));
        assert_eq!(parse_duration("0.001ms"), Ok(Duration::from_nanos(1_000)));
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        for bad in [
            "", "10", "s", "10x", "1..5s", ".s", "-1s", "1.5", "0.5ns", "1e3s", "10 s",
        ] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains("duration"), "{bad:?}: {err}");
        }
        let huge = "99999999999999999999999999999999999999999h";
        assert!(parse_duration(huge).is_err());
        assert!(parse_duration("300000000000000d").is_err());
    }

    #[test]
    fn formats_largest_units_first() {
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(Duration::from_secs(5_400)), "1h30m");
        assert_eq!(format_duration(Duration::from_millis(1_500)), "1s500ms");
        assert_eq!(format_duration(Duration::from_micros(250)), "250us");
        assert_eq!(
            format_duration(Duration::from_nanos(3_600_000_000_001)),
            "1h1ns"
        );
    }

    #[test]
    fn serde_adapter_reads_strings_and_seconds() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Holder {
            #[serde(with = "human")]
            d: Duration,
        }
        let h: Holder = toml::from_str("d = \"1m30s\"").unwrap();
        assert_eq!(h.d, Duration::from_secs(90));
        let h: Holder = toml::from_str("d = 5").unwrap();
        assert_eq!(h.d, Duration::from_secs(5));
        let err = toml::from_str::<Holder>("d = \"5 parsecs\"").unwrap_err();
        assert!(err.to_string().contains("5 parsecs"), "{err}");
        assert_eq!(
            serde_json::to_string(&Holder {
                d: Duration::from_millis(1500)
            })
            .unwrap(),
            r#"{"d":"1s500ms"}"#
        );
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(secs in 0u64..10_000_000_000, nanos in 0u32..1_000_000_000) {
            let d = Duration::new(secs, nanos);
            prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }

        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,20}") {
            let _ = parse_duration(&s);
        }
    }
}
