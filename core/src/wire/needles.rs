//! Looking for several needles in a value at once: one pass over the value, comparing only where
//! a needle's first byte is (the filter searches request headers for copies of the workload's
//! credential, and response headers for reflections of the vendor key). Needles are kept as
//! `Secret`s: wiped when dropped, never printed.

use crate::secret::Secret;

/// A set of needles.
pub struct NeedleSet {
    needles: Vec<Secret>,
    first: [bool; 256],
    /// The shortest needle's length: a shorter value (most header names) holds none.
    shortest: usize,
}

impl Default for NeedleSet {
    fn default() -> NeedleSet {
        NeedleSet { needles: Vec::new(), first: [false; 256], shortest: usize::MAX }
    }
}

impl NeedleSet {
    /// Add `needle` unless it is shorter than `min` or already there.
    pub fn add(&mut self, needle: &[u8], min: usize) {
        if needle.len() < min || self.needles.iter().any(|n| n.expose() == needle) {
            return;
        }
        if let Some(slot) = needle.first().and_then(|b| self.first.get_mut(usize::from(*b))) {
            *slot = true;
        }
        self.needles.push(Secret::new(needle.to_vec()));
        self.shortest = self.shortest.min(needle.len());
    }

    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// The length of the shortest needle (`usize::MAX` with none).
    pub fn shortest(&self) -> usize {
        self.shortest
    }

    /// Does `hay` contain any needle?
    pub fn in_(&self, hay: &[u8]) -> bool {
        if hay.len() < self.shortest() {
            return false;
        }
        hay.iter().enumerate().any(|(i, b)| {
            self.first.get(usize::from(*b)) == Some(&true) && self.needles.iter().any(|n| hay.get(i..i + n.expose().len()).is_some_and(|w| w == n.expose()))
        })
    }
}

impl std::fmt::Debug for NeedleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NeedleSet({} needles)", self.needles.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_any_needle_anywhere_and_nothing_else() {
        let mut s = NeedleSet::default();
        s.add(b"needle-one", 4);
        s.add(b"other-needle", 4);
        s.add(b"abc", 4);
        assert!(s.in_(b"xx needle-one yy") && s.in_(b"other-needle") && s.in_(b"other-needleX"));
        assert!(!s.in_(b"needle-on") && !s.in_(b"abc abc") && !s.in_(b""));
        assert_eq!(s.shortest(), 10);
        assert!(!format!("{s:?}").contains("needle-one"));
    }
}
