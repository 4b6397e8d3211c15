//! Interned strings for the values millions of devices repeat: tenants, commune codes, codecs.
//!
//! A city has a few tenants and a few thousand communes but millions of devices; each device
//! keeping its own copy of "hanoi" and "00070" was a third of the registry's memory. A [`Sym`]
//! is one pointer to a string kept once for the life of the process. The set of values is
//! bounded by what operators register (tenants are slugs, communes five digits, codecs a fixed
//! list), so the table is never pruned. A hand-written table rather than a crate (ustr, lasso):
//! it is a mutex around a map, and nothing on the hot path takes it (only registration and
//! start-up do).

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

/// A string kept once per process; compares by pointer, reads without a lock.
#[derive(Clone, Copy)]
pub struct Sym(&'static String);

static TABLE: LazyLock<Mutex<HashMap<&'static str, Sym>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

impl Sym {
    pub fn new(s: &str) -> Sym {
        let mut table = TABLE.lock().expect("intern table");
        if let Some(sym) = table.get(s) {
            return *sym;
        }
        let kept: &'static String = Box::leak(Box::new(s.to_owned()));
        let sym = Sym(kept);
        table.insert(kept.as_str(), sym);
        sym
    }

    pub fn as_str(self) -> &'static str {
        self.0.as_str()
    }
}

impl PartialEq for Sym {
    fn eq(&self, other: &Sym) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}

impl Eq for Sym {}

impl std::fmt::Debug for Sym {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_strings_share_one_copy() {
        let a = Sym::new("hanoi");
        let b = Sym::new(&String::from("hanoi"));
        assert_eq!(a, b);
        assert!(std::ptr::eq(a.as_str(), b.as_str()));
        assert_ne!(a, Sym::new("hcmc"));
        assert_eq!(Sym::new("").as_str(), "");
    }
}
