//! Budgets above a single credential (a team's, a role's): a cap on the spend (and optionally the
//! requests) of every credential whose subject matches, per UTC calendar day or month, kept in the
//! fleet ledger like a credential's own caps. A request is admitted only if every budget that
//! covers it has room too.

use std::fmt::Write;

/// A budget's period: UTC calendar days or months.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Day,
    Month,
}

/// Which credentials a budget covers: a subject, or every subject that starts with a prefix
/// (`sub:lambda/checkout*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    Subject(String),
    SubjectPrefix(String),
}

impl Match {
    /// `sub:<subject>` or `sub:<prefix>*`. `None`: not a matcher.
    pub fn parse(s: &str) -> Option<Match> {
        let sub = s.strip_prefix("sub:")?;
        if sub.is_empty() || sub.len() > 256 || sub.chars().any(char::is_control) {
            return None;
        }
        match sub.strip_suffix('*') {
            Some(p) if p.contains('*') => None,
            Some(p) => Some(Match::SubjectPrefix(p.to_string())),
            None if sub.contains('*') => None,
            None => Some(Match::Subject(sub.to_string())),
        }
    }

    pub fn covers(&self, subject: &str) -> bool {
        match self {
            Match::Subject(s) => s == subject,
            Match::SubjectPrefix(p) => subject.starts_with(p.as_str()),
        }
    }
}

/// A compiled budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub name: String,
    pub matcher: Match,
    /// The most its credentials may spend per window, in the cost unit of the targets it counts.
    pub spend: Option<u64>,
    /// The most requests its credentials may make per window.
    pub requests: Option<u64>,
    pub window: Window,
    /// The targets whose costs it counts (`None`: every target).
    pub targets: Option<Vec<String>>,
}

impl Budget {
    /// Does this budget cover a request of `subject` to `target`?
    pub fn covers(&self, subject: &str, target: &str) -> bool {
        self.matcher.covers(subject) && self.targets.as_ref().is_none_or(|t| t.iter().any(|n| n == target))
    }
}

/// Days since 1970-01-01 to a (year, month, day) civil date (proleptic Gregorian).
pub fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A civil date to days since 1970-01-01.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Window {
    /// The window that holds `now_s`: its name (`2026-12-07`, `2026-12`) and when it ends (the
    /// next window's first second).
    pub fn at(self, now_s: u64) -> (String, u64) {
        let days = (now_s / 86_400) as i64;
        let (y, m, d) = civil(days);
        let mut name = String::with_capacity(10);
        match self {
            Window::Day => {
                let _ = write!(name, "{y:04}-{m:02}-{d:02}");
                (name, ((days + 1) * 86_400) as u64)
            }
            Window::Month => {
                let _ = write!(name, "{y:04}-{m:02}");
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (name, (days_from_civil(ny, nm, 1) * 86_400) as u64)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip_over_four_centuries() {
        for days in (-146_097 * 2..146_097 * 2).step_by(7) {
            let (y, m, d) = civil(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(20_794), (2026, 12, 7));
        assert_eq!(civil(11_016), (2000, 2, 29), "a leap day of a century divisible by 400");
    }

    #[test]
    fn windows_turn_at_midnight_utc_and_on_the_first_of_the_month() {
        let dec31_last = days_from_civil(2026, 12, 31) as u64 * 86_400 + 86_399;
        assert_eq!(Window::Month.at(dec31_last), ("2026-12".to_string(), days_from_civil(2027, 1, 1) as u64 * 86_400));
        assert_eq!(Window::Month.at(dec31_last + 1).0, "2027-01");
        assert_eq!(Window::Day.at(dec31_last), ("2026-12-31".to_string(), dec31_last + 1));
        assert_eq!(Window::Day.at(dec31_last + 1).0, "2027-01-01");
        let feb28 = days_from_civil(2028, 2, 28) as u64 * 86_400;
        assert_eq!(Window::Day.at(feb28 + 86_400).0, "2028-02-29");
        assert_eq!(Window::Month.at(feb28).1, days_from_civil(2028, 3, 1) as u64 * 86_400);
    }

    #[test]
    fn matchers() {
        assert_eq!(Match::parse("sub:lambda/checkout*"), Some(Match::SubjectPrefix("lambda/checkout".into())));
        assert_eq!(Match::parse("sub:lambda/checkout"), Some(Match::Subject("lambda/checkout".into())));
        for bad in ["lambda/x", "sub:", "sub:a*b", "sub:*a*", "role:x"] {
            assert_eq!(Match::parse(bad), None, "{bad}");
        }
        let m = Match::parse("sub:lambda/checkout*").unwrap_or(Match::Subject(String::new()));
        assert!(m.covers("lambda/checkout") && m.covers("lambda/checkout-eu") && !m.covers("lambda/check"));
        assert!(Match::parse("sub:*").is_some_and(|m| m.covers("anything")));
    }
}
