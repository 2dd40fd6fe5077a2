//! Typed scalar values of the spec: quantities, durations, versions, timestamps, recurrence
//! rules. Each parses from the string a user writes and serializes back to a canonical string.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a scalar value did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(String);

impl ValueError {
    fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// Implements `Serialize` via `Display` and `Deserialize` via `FromStr` for a value type.
/// `expecting` is the phrase serde puts after "expected" in type errors.
macro_rules! string_serde {
    ($ty:ty, $expecting:literal) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        v.parse().map_err(|e: ValueError| E::custom(e))
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

/// An amount of bytes written like Kubernetes quantities: `2Gi`, `2048Mi`, `512Ki`, `20G`, `1000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Quantity(u64);

const BINARY_UNITS: [(&str, u64); 5] = [
    ("Ei", 1 << 60),
    ("Pi", 1 << 50),
    ("Ti", 1 << 40),
    ("Gi", 1 << 30),
    ("Mi", 1 << 20),
];
const ALL_UNITS: [(&str, u64); 12] = [
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("Pi", 1 << 50),
    ("Ei", 1 << 60),
    ("k", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
    ("P", 1_000_000_000_000_000),
    ("E", 1_000_000_000_000_000_000),
];

impl Quantity {
    /// A quantity of `bytes` bytes.
    pub const fn from_bytes(bytes: u64) -> Self {
        Self(bytes)
    }

    /// Number of bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// Number of whole mebibytes (rounded down).
    pub const fn mebibytes(self) -> u64 {
        self.0 >> 20
    }
}

impl FromStr for Quantity {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let bad = || {
            ValueError::new(format!(
                "invalid quantity {s:?}: expected an integer with an optional unit Ki, Mi, Gi, Ti (or k, M, G, T), such as 2Gi"
            ))
        };
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        if digits.is_empty() {
            return Err(bad());
        }
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let mult = if unit.is_empty() {
            1
        } else {
            ALL_UNITS
                .iter()
                .find(|(u, _)| *u == unit)
                .map(|(_, m)| *m)
                .ok_or_else(bad)?
        };
        n.checked_mul(mult)
            .map(Quantity)
            .ok_or_else(|| ValueError::new(format!("quantity {s:?} is too large")))
    }
}

impl fmt::Display for Quantity {
    /// Canonical form: the largest binary unit that divides the amount exactly, else bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("0");
        }
        for (unit, mult) in BINARY_UNITS
            .iter()
            .chain(std::iter::once(&("Ki", 1u64 << 10)))
        {
            if self.0.is_multiple_of(*mult) {
                return write!(f, "{}{unit}", self.0 / mult);
            }
        }
        write!(f, "{}", self.0)
    }
}

string_serde!(Quantity, "a quantity such as 2Gi");

/// A span of time written like `30s`, `5m`, `4h`, `1h30m` or `7d`; whole seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(u64);

impl Duration {
    /// A duration of `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(secs)
    }

    /// Length in seconds.
    pub const fn as_secs(self) -> u64 {
        self.0
    }

    /// As a standard library duration.
    pub const fn to_std(self) -> std::time::Duration {
        std::time::Duration::from_secs(self.0)
    }
}

impl FromStr for Duration {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let bad = || {
            ValueError::new(format!(
                "invalid duration {s:?}: expected numbers with units d, h, m, s, such as 30s, 5m or 1h30m"
            ))
        };
        if s.is_empty() {
            return Err(bad());
        }
        let mut total: u64 = 0;
        let mut rest = s;
        while !rest.is_empty() {
            let split = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
            if split == 0 {
                return Err(bad());
            }
            let n: u64 = rest[..split].parse().map_err(|_| bad())?;
            let unit = rest[split..].chars().next().ok_or_else(bad)?;
            let mult = match unit {
                'd' => 86_400,
                'h' => 3_600,
                'm' => 60,
                's' => 1,
                _ => return Err(bad()),
            };
            total = n
                .checked_mul(mult)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(|| ValueError::new(format!("duration {s:?} is too large")))?;
            rest = &rest[split + unit.len_utf8()..];
        }
        Ok(Duration(total))
    }
}

impl fmt::Display for Duration {
    /// Canonical form such as `1h30m`, `5m`, `0s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("0s");
        }
        let mut left = self.0;
        for (unit, mult) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
            if left >= mult {
                write!(f, "{}{unit}", left / mult)?;
                left %= mult;
            }
        }
        Ok(())
    }
}

string_serde!(Duration, "a duration such as 5m");

/// An exact Kubernetes version `MAJOR.MINOR.PATCH` (a leading `v` is accepted and dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KubernetesVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Patch version.
    pub patch: u32,
}

impl FromStr for KubernetesVersion {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let bad = || {
            ValueError::new(format!(
                "invalid kubernetes version {s:?}: expected MAJOR.MINOR.PATCH such as \"1.30.2\" (quote it in YAML)"
            ))
        };
        let body = s.strip_prefix('v').unwrap_or(s);
        let mut parts = body.split('.');
        let mut next = || -> Result<u32, ValueError> {
            let p = parts.next().ok_or_else(bad)?;
            if p.is_empty()
                || !p.bytes().all(|b| b.is_ascii_digit())
                || (p.len() > 1 && p.starts_with('0'))
            {
                return Err(bad());
            }
            p.parse().map_err(|_| bad())
        };
        let v = KubernetesVersion {
            major: next()?,
            minor: next()?,
            patch: next()?,
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(v)
    }
}

impl fmt::Display for KubernetesVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl Serialize for KubernetesVersion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KubernetesVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KubernetesVersion;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a version MAJOR.MINOR.PATCH such as \"1.30.2\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KubernetesVersion, E> {
                v.parse().map_err(|e: ValueError| E::custom(e))
            }
            // `version: 1.30` is a YAML float; say so instead of a bare type error.
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<KubernetesVersion, E> {
                Err(E::custom(format!(
                    "invalid kubernetes version {v}: expected MAJOR.MINOR.PATCH such as \"1.30.2\" (quote it in YAML)"
                )))
            }
        }
        d.deserialize_str(V)
    }
}

/// A point in time written in RFC 3339 (`2026-01-03T02:00:00Z`, `2026-01-03T03:00:00+01:00`).
/// Keeps the text as written; compares by instant.
#[derive(Debug, Clone)]
pub struct Timestamp {
    text: String,
    unix: i64,
}

impl Timestamp {
    /// Seconds since 1970-01-01T00:00:00Z (fractions dropped).
    pub fn unix_seconds(&self) -> i64 {
        self.unix
    }

    /// The timestamp as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl PartialEq for Timestamp {
    fn eq(&self, other: &Self) -> bool {
        self.unix == other.unix
    }
}

impl Eq for Timestamp {}

impl PartialOrd for Timestamp {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Timestamp {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.unix.cmp(&other.unix)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

impl FromStr for Timestamp {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let bad = || {
            ValueError::new(format!(
                "invalid timestamp {s:?}: expected RFC 3339 such as 2026-01-03T02:00:00Z"
            ))
        };
        let b = s.as_bytes();
        let num = |from: usize, len: usize| -> Result<i64, ValueError> {
            let part = b.get(from..from + len).ok_or_else(bad)?;
            if !part.iter().all(u8::is_ascii_digit) {
                return Err(bad());
            }
            std::str::from_utf8(part)
                .map_err(|_| bad())?
                .parse()
                .map_err(|_| bad())
        };
        let sep = |at: usize, allowed: &[u8]| -> Result<(), ValueError> {
            match b.get(at) {
                Some(c) if allowed.contains(c) => Ok(()),
                _ => Err(bad()),
            }
        };
        let (y, mo, d) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
        sep(4, b"-")?;
        sep(7, b"-")?;
        sep(10, b"Tt ")?;
        let (h, mi, se) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
        sep(13, b":")?;
        sep(16, b":")?;
        let mut i = 19;
        if b.get(i) == Some(&b'.') {
            i += 1;
            let start = i;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            if i == start {
                return Err(bad());
            }
        }
        let offset = match b.get(i) {
            Some(b'Z' | b'z') if i + 1 == b.len() => 0,
            Some(sign @ (b'+' | b'-')) if i + 6 == b.len() => {
                sep(i + 3, b":")?;
                let (oh, om) = (num(i + 1, 2)?, num(i + 4, 2)?);
                if oh > 23 || om > 59 {
                    return Err(bad());
                }
                let o = oh * 3600 + om * 60;
                if *sign == b'-' { -o } else { o }
            }
            _ => return Err(bad()),
        };
        if !(1..=12).contains(&mo)
            || d < 1
            || d > days_in_month(y, mo)
            || h > 23
            || mi > 59
            || se > 60
        {
            return Err(ValueError::new(format!(
                "invalid timestamp {s:?}: date or time out of range"
            )));
        }
        let unix = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se - offset;
        Ok(Timestamp {
            text: s.to_owned(),
            unix,
        })
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

string_serde!(
    Timestamp,
    "an RFC 3339 timestamp such as 2026-01-03T02:00:00Z"
);

/// Frequency of a recurrence rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frequency {
    /// Every day.
    Daily,
    /// Every week (on `BYDAY` days, else the start's weekday).
    Weekly,
    /// Every month (on `BYMONTHDAY` days, else the start's day).
    Monthly,
}

/// A day of the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Weekday {
    /// Monday.
    Mo,
    /// Tuesday.
    Tu,
    /// Wednesday.
    We,
    /// Thursday.
    Th,
    /// Friday.
    Fr,
    /// Saturday.
    Sa,
    /// Sunday.
    Su,
}

impl Weekday {
    const ALL: [(Weekday, &'static str); 7] = [
        (Weekday::Mo, "MO"),
        (Weekday::Tu, "TU"),
        (Weekday::We, "WE"),
        (Weekday::Th, "TH"),
        (Weekday::Fr, "FR"),
        (Weekday::Sa, "SA"),
        (Weekday::Su, "SU"),
    ];

    /// Two-letter RRULE code.
    pub fn code(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(d, _)| *d == self)
            .map_or("MO", |(_, c)| c)
    }
}

/// A recurrence rule, the RFC 5545 RRULE subset GKE maintenance windows use:
/// `FREQ=DAILY|WEEKLY|MONTHLY`, optional `INTERVAL=N`, `BYDAY=MO,TU,...` (weekly),
/// `BYMONTHDAY=1,15` (monthly).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recurrence {
    /// How often.
    pub freq: Frequency,
    /// Every N-th period (1 = every).
    pub interval: u32,
    /// Days of the week (weekly rules).
    pub by_day: Vec<Weekday>,
    /// Days of the month (monthly rules).
    pub by_month_day: Vec<u8>,
}

impl Recurrence {
    /// Shortest time between two occurrence starts, used to check that a window ends before
    /// the next one begins. Months count as 28 days, the shortest.
    pub fn shortest_gap_secs(&self) -> u64 {
        const DAY: u64 = 86_400;
        let interval = u64::from(self.interval);
        // Offsets (in days) of the occurrences within one period, and the period's length.
        let (mut offsets, period): (Vec<u64>, u64) = match self.freq {
            Frequency::Daily => (Vec::new(), interval),
            Frequency::Weekly => (
                self.by_day.iter().map(|d| *d as u64).collect(),
                7 * interval,
            ),
            Frequency::Monthly => (
                self.by_month_day.iter().map(|d| u64::from(*d)).collect(),
                28 * interval,
            ),
        };
        offsets.sort_unstable();
        let (Some(first), Some(last)) = (offsets.first(), offsets.last()) else {
            return period * DAY;
        };
        let wrap = period - (last - first);
        let inner = offsets
            .windows(2)
            .map(|w| w[1] - w[0])
            .min()
            .unwrap_or(wrap);
        inner.min(wrap) * DAY
    }
}

impl FromStr for Recurrence {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let bad = |why: &str| {
            ValueError::new(format!(
                "invalid recurrence {s:?}: {why}; expected an RRULE such as FREQ=WEEKLY;BYDAY=SA,SU or FREQ=DAILY"
            ))
        };
        let body = s.strip_prefix("RRULE:").unwrap_or(s);
        let (mut freq, mut interval, mut by_day, mut by_month_day) =
            (None, None, Vec::new(), Vec::new());
        for part in body.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(&format!("{part:?} is not KEY=VALUE")))?;
            match k {
                "FREQ" => {
                    freq = Some(match v {
                        "DAILY" => Frequency::Daily,
                        "WEEKLY" => Frequency::Weekly,
                        "MONTHLY" => Frequency::Monthly,
                        _ => {
                            return Err(bad(&format!(
                                "unsupported FREQ {v:?} (use DAILY, WEEKLY or MONTHLY)"
                            )));
                        }
                    })
                }
                "INTERVAL" => {
                    let n: u32 = v
                        .parse()
                        .map_err(|_| bad(&format!("INTERVAL {v:?} is not a number")))?;
                    if n == 0 {
                        return Err(bad("INTERVAL must be at least 1"));
                    }
                    interval = Some(n);
                }
                "BYDAY" => {
                    for d in v.split(',') {
                        let day = Weekday::ALL
                            .iter()
                            .find(|(_, c)| *c == d)
                            .map(|(w, _)| *w)
                            .ok_or_else(|| {
                                bad(&format!(
                                    "unknown day {d:?} (use MO, TU, WE, TH, FR, SA, SU)"
                                ))
                            })?;
                        if by_day.contains(&day) {
                            return Err(bad(&format!("day {d} repeated")));
                        }
                        by_day.push(day);
                    }
                }
                "BYMONTHDAY" => {
                    for d in v.split(',') {
                        let n: u8 = d
                            .parse()
                            .map_err(|_| bad(&format!("BYMONTHDAY {d:?} is not a number")))?;
                        if !(1..=28).contains(&n) {
                            return Err(bad(&format!("BYMONTHDAY {n} is out of range 1..=28")));
                        }
                        by_month_day.push(n);
                    }
                }
                _ => return Err(bad(&format!("unsupported part {k:?}"))),
            }
        }
        let freq = freq.ok_or_else(|| bad("FREQ is missing"))?;
        if !by_day.is_empty() && freq != Frequency::Weekly {
            return Err(bad("BYDAY needs FREQ=WEEKLY"));
        }
        if !by_month_day.is_empty() && freq != Frequency::Monthly {
            return Err(bad("BYMONTHDAY needs FREQ=MONTHLY"));
        }
        Ok(Recurrence {
            freq,
            interval: interval.unwrap_or(1),
            by_day,
            by_month_day,
        })
    }
}

impl fmt::Display for Recurrence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let freq = match self.freq {
            Frequency::Daily => "DAILY",
            Frequency::Weekly => "WEEKLY",
            Frequency::Monthly => "MONTHLY",
        };
        write!(f, "FREQ={freq}")?;
        if self.interval != 1 {
            write!(f, ";INTERVAL={}", self.interval)?;
        }
        if !self.by_day.is_empty() {
            let days: Vec<&str> = self.by_day.iter().map(|d| d.code()).collect();
            write!(f, ";BYDAY={}", days.join(","))?;
        }
        if !self.by_month_day.is_empty() {
            let days: Vec<String> = self.by_month_day.iter().map(u8::to_string).collect();
            write!(f, ";BYMONTHDAY={}", days.join(","))?;
        }
        Ok(())
    }
}

string_serde!(
    Recurrence,
    "a recurrence rule such as FREQ=WEEKLY;BYDAY=SA,SU"
);

/// Brake of auto-repair: an absolute number of nodes or a percentage of all nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxUnhealthy {
    /// At most this many nodes.
    Count(u32),
    /// At most this percentage (0..=100) of nodes, rounded down.
    Percent(u8),
}

impl MaxUnhealthy {
    /// The limit as a node count for a cluster of `total` nodes.
    pub fn limit(self, total: u32) -> u32 {
        match self {
            MaxUnhealthy::Count(n) => n,
            MaxUnhealthy::Percent(p) => {
                u32::try_from(u64::from(total) * u64::from(p) / 100).unwrap_or(u32::MAX)
            }
        }
    }
}

impl FromStr for MaxUnhealthy {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let bad = || {
            ValueError::new(format!(
                "invalid maxUnhealthy {s:?}: expected a node count such as 2 or a percentage such as \"40%\""
            ))
        };
        if let Some(p) = s.strip_suffix('%') {
            let p: u8 = p.parse().map_err(|_| bad())?;
            if p > 100 {
                return Err(ValueError::new(format!(
                    "invalid maxUnhealthy {s:?}: a percentage is at most 100%"
                )));
            }
            return Ok(MaxUnhealthy::Percent(p));
        }
        s.parse().map(MaxUnhealthy::Count).map_err(|_| bad())
    }
}

impl fmt::Display for MaxUnhealthy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaxUnhealthy::Count(n) => write!(f, "{n}"),
            MaxUnhealthy::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for MaxUnhealthy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MaxUnhealthy::Count(n) => s.serialize_u32(*n),
            MaxUnhealthy::Percent(_) => s.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for MaxUnhealthy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = MaxUnhealthy;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a node count such as 2 or a percentage such as \"40%\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<MaxUnhealthy, E> {
                u32::try_from(v)
                    .map(MaxUnhealthy::Count)
                    .map_err(|_| E::custom("maxUnhealthy is too large"))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<MaxUnhealthy, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("maxUnhealthy must not be negative"))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MaxUnhealthy, E> {
                v.parse().map_err(|e: ValueError| E::custom(e))
            }
        }
        d.deserialize_any(V)
    }
}

/// Serde adapter for CIDR fields (`#[serde(with = "cidr")]`): `ipnet`'s own errors do not
/// name the bad value.
pub mod cidr {
    use super::*;
    use ipnet::IpNet;

    /// Serializes a network as `ADDRESS/PREFIX`.
    pub fn serialize<S: Serializer>(net: &IpNet, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(net)
    }

    /// Parses `ADDRESS/PREFIX`, naming the bad value in the error.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IpNet;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a CIDR such as 10.77.0.0/24")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IpNet, E> {
                v.parse().map_err(|_| {
                    E::custom(format!(
                        "invalid CIDR {v:?}: expected ADDRESS/PREFIX such as 10.77.0.0/24"
                    ))
                })
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantity_parses_and_prints_canonically() {
        let q: Quantity = "2048Mi".parse().expect("valid");
        assert_eq!(q.bytes(), 2 << 30);
        assert_eq!(q.to_string(), "2Gi");
        assert_eq!(
            "1500Mi".parse::<Quantity>().map(|q| q.to_string()),
            Ok("1500Mi".to_owned())
        );
        assert_eq!(
            "1G".parse::<Quantity>().map(|q| q.bytes()),
            Ok(1_000_000_000)
        );
        assert!("2GB".parse::<Quantity>().is_err());
        assert!("Gi".parse::<Quantity>().is_err());
        assert!("-1Gi".parse::<Quantity>().is_err());
        assert!("99999999999Ei".parse::<Quantity>().is_err());
        // Every canonical form parses back.
        for bytes in [
            0,
            1,
            1023,
            1 << 10,
            3 << 20,
            5 << 30,
            7 << 40,
            1 << 50,
            1 << 60,
            1_000_000,
        ] {
            let q = Quantity::from_bytes(bytes);
            assert_eq!(q.to_string().parse::<Quantity>(), Ok(q), "{q}");
        }
    }

    #[test]
    fn duration_parses_and_prints_canonically() {
        assert_eq!("1h30m".parse::<Duration>().map(|d| d.as_secs()), Ok(5400));
        assert_eq!(
            "90m".parse::<Duration>().map(|d| d.to_string()),
            Ok("1h30m".to_owned())
        );
        assert_eq!("2d".parse::<Duration>().map(|d| d.as_secs()), Ok(172_800));
        for bad in ["", "5", "h", "5x", "1h 30m", "-5m"] {
            assert!(bad.parse::<Duration>().is_err(), "{bad}");
        }
    }

    #[test]
    fn kubernetes_version_needs_three_parts() {
        assert_eq!(
            "v1.30.2".parse::<KubernetesVersion>(),
            Ok(KubernetesVersion {
                major: 1,
                minor: 30,
                patch: 2
            })
        );
        for bad in ["1.30", "1.30.2.1", "1.x.2", "1.030.2", "", "1..2"] {
            assert!(bad.parse::<KubernetesVersion>().is_err(), "{bad}");
        }
    }

    #[test]
    fn timestamps_compare_by_instant() {
        let a: Timestamp = "2026-01-03T02:00:00Z".parse().expect("valid");
        let b: Timestamp = "2026-01-03T03:00:00+01:00".parse().expect("valid");
        assert_eq!(a, b);
        assert_eq!(a.unix_seconds(), 1_767_405_600);
        assert_eq!(
            "1970-01-01T00:00:00.5Z"
                .parse::<Timestamp>()
                .map(|t| t.unix_seconds()),
            Ok(0)
        );
        for bad in [
            "2026-02-30T00:00:00Z",
            "2026-01-03",
            "2026-01-03T02:00:00",
            "2026-13-01T00:00:00Z",
            "2026-01-03T02:00:00+1:00",
        ] {
            assert!(bad.parse::<Timestamp>().is_err(), "{bad}");
        }
    }

    #[test]
    fn recurrence_round_trips() {
        let r: Recurrence = "FREQ=WEEKLY;BYDAY=SA,SU".parse().expect("valid");
        assert_eq!(r.by_day, vec![Weekday::Sa, Weekday::Su]);
        assert_eq!(r.to_string(), "FREQ=WEEKLY;BYDAY=SA,SU");
        assert_eq!(
            "RRULE:FREQ=DAILY"
                .parse::<Recurrence>()
                .map(|r| r.to_string()),
            Ok("FREQ=DAILY".to_owned())
        );
        for bad in [
            "",
            "FREQ=HOURLY",
            "FREQ=DAILY;BYDAY=MO",
            "FREQ=WEEKLY;BYDAY=XX",
            "BYDAY=MO",
            "FREQ=WEEKLY;COUNT=3",
            "FREQ=MONTHLY;BYMONTHDAY=31",
        ] {
            assert!(bad.parse::<Recurrence>().is_err(), "{bad}");
        }
    }

    #[test]
    fn recurrence_gaps() {
        let gap = |r: &str| r.parse::<Recurrence>().expect("valid").shortest_gap_secs() / 86_400;
        assert_eq!(gap("FREQ=DAILY"), 1);
        assert_eq!(gap("FREQ=DAILY;INTERVAL=2"), 2);
        assert_eq!(gap("FREQ=WEEKLY"), 7);
        assert_eq!(gap("FREQ=WEEKLY;BYDAY=MO,TH"), 3);
        assert_eq!(gap("FREQ=WEEKLY;BYDAY=SA,SU"), 1);
        assert_eq!(gap("FREQ=WEEKLY;BYDAY=SU,MO"), 1);
        assert_eq!(gap("FREQ=WEEKLY;INTERVAL=2;BYDAY=MO"), 14);
        assert_eq!(gap("FREQ=MONTHLY;BYMONTHDAY=1,15"), 14);
        assert_eq!(gap("FREQ=MONTHLY"), 28);
    }

    #[test]
    fn max_unhealthy_is_count_or_percent() {
        assert_eq!("40%".parse(), Ok(MaxUnhealthy::Percent(40)));
        assert_eq!("3".parse(), Ok(MaxUnhealthy::Count(3)));
        assert!("101%".parse::<MaxUnhealthy>().is_err());
        assert_eq!(MaxUnhealthy::Percent(40).limit(5), 2);
    }
}
