//! Fuzz targets for every parser that reads bytes an attacker chooses, run by `cargo test`.
//!
//! Why here and not under cargo-fuzz: cargo-fuzz needs a nightly toolchain (sanitizer flags),
//! which this project's machines and CI do not have. These targets run on stable inside the
//! ordinary test binary, for a bounded number of cases, so every CI run exercises them; a longer
//! run is the same test with more cases (see docs/src/testing.md, "Fuzzing"):
//!
//! ```text
//! PROPTEST_CASES=200000 PROPTEST_RNG_SEED=$RANDOM cargo test -p citygw --release fuzz::
//! ```
//!
//! Each target first replays its committed corpus (`gateway/fuzz/corpus/<target>/`: valid
//! examples and every crash found so far), then feeds proptest-generated inputs: a corpus entry
//! with a few byte-level mutations (bit flips, interesting bytes, inserted tokens, cut or
//! duplicated ranges, a splice with another entry), or plain random bytes. Starting from valid
//! documents is what gets mutated inputs past the first syntax check and into the decoders'
//! semantics (docs/decisions/0026-fuzzing-on-stable.md has the measurement). A failing input is
//! shrunk by proptest and printed; it goes into the corpus as a `crash-*` file with the fix.
//!
//! The properties go beyond "does not panic": a decoder that accepts a payload returns values the
//! schema can hold (finite numbers, times within 1970..=9999, valid positions); a refusal carries a
//! stable reason code and a bounded detail, because both reach metrics labels, logs and dead
//! letters.

mod coap;
mod codecs;
mod lorawan;
mod round_trips;
mod sinks;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};

/// Cases per target in an ordinary `cargo test` run: enough to catch a regression in seconds.
const DEFAULT_CASES: u32 = 400;

/// Seed of an ordinary run, so CI is repeatable; set `PROPTEST_RNG_SEED` to explore elsewhere.
const DEFAULT_SEED: u64 = 0x00c1_7967_f022;

/// The runner configuration: `PROPTEST_CASES` and `PROPTEST_RNG_SEED` win when set.
pub(crate) fn config() -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = DEFAULT_CASES;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        config.rng_seed = RngSeed::Fixed(DEFAULT_SEED);
    }
    // Corpus files, not proptest's seed files, are the regression cases: they survive a change
    // of the input strategy.
    config.failure_persistence = None;
    config
}

/// Bytes with a readable `Debug`, so a shrunk failing input can be pasted into a corpus file.
#[derive(Clone)]
pub(crate) struct Input(pub Vec<u8>);

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "b\"{}\" ({} bytes)", self.0.escape_ascii(), self.0.len())
    }
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// The committed corpus of `target`, sorted by file name.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    files
        .into_iter()
        .map(|p| {
            let name = p
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            (name, std::fs::read(&p).expect("corpus file"))
        })
        .collect()
}

/// Tokens worth inserting: the structure of JSON and CBOR, numbers at the edges of their types,
/// and the keys the decoders look for.
const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"\"",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"null",
    b"true",
    b"-",
    b"0",
    b"-0",
    b"1e999",
    b"NaN",
    b"-Infinity",
    b"1e-400",
    b"18446744073709551616",
    b"9223372036854775807",
    b"2e28",
    b"\"v\":",
    b"\"n\":",
    b"\"bn\":",
    b"\"t\":",
    b"\"bt\":",
    b"\"vs\":",
    b"\"ts\":",
    b"\"lat\":",
    b"\"seq\":",
    b"\"values\":",
    b"\xef\xbb\xbf",
    b"\xff",
    b"\x00",
    b"\x80",
    b"\xf9\x7e\x00",
    b"\xfb\x7f\xf0\x00\x00\x00\x00\x00\x00",
    b"\x9f",
    b"\xbf",
    b"\xc1",
    b"\x1b\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\x3b\xff\xff\xff\xff\xff\xff\xff\xff",
    b"/",
    b"+",
    b"#",
    b"\n",
    b"\xc3\x28",
];

/// Bytes at the edges of signed and unsigned ranges.
const INTERESTING: &[u8] = &[0x00, 0x01, 0x7f, 0x80, 0xfe, 0xff, 0x20, 0x3f];

/// One byte-level change; positions are taken modulo the input length when applied, so every
/// generated mutation applies and shrinking towards 0 stays meaningful.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(usize, u8),
    Interesting(usize, usize),
    Random(usize, u8),
    Token(usize, usize),
    Remove(usize, usize),
    Duplicate(usize, usize),
    Truncate(usize),
    Splice(usize, usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(p, b)| Mutation::FlipBit(p, b)),
        (any::<usize>(), any::<usize>()).prop_map(|(p, i)| Mutation::Interesting(p, i)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Random(p, b)),
        (any::<usize>(), any::<usize>()).prop_map(|(p, t)| Mutation::Token(p, t)),
        (any::<usize>(), 1usize..16).prop_map(|(p, n)| Mutation::Remove(p, n)),
        (any::<usize>(), 1usize..32).prop_map(|(p, n)| Mutation::Duplicate(p, n)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<usize>(), any::<usize>())
            .prop_map(|(o, from, at)| Mutation::Splice(o, from, at)),
    ]
}

fn apply(corpus: &[Vec<u8>], mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    let at = |p: usize, len: usize| if len == 0 { 0 } else { p % (len + 1) };
    for m in mutations {
        let len = bytes.len();
        match *m {
            Mutation::FlipBit(p, bit) if len > 0 => bytes[p % len] ^= 1 << bit,
            Mutation::Interesting(p, i) if len > 0 => {
                bytes[p % len] = INTERESTING[i % INTERESTING.len()]
            }
            Mutation::Random(p, b) if len > 0 => bytes[p % len] = b,
            Mutation::Token(p, t) => {
                let p = at(p, len);
                bytes.splice(p..p, TOKENS[t % TOKENS.len()].iter().copied());
            }
            Mutation::Remove(p, n) if len > 0 => {
                let p = p % len;
                bytes.drain(p..(p + n).min(len));
            }
            Mutation::Duplicate(p, n) if len > 0 => {
                let p = p % len;
                let chunk = bytes[p..(p + n).min(len)].to_vec();
                bytes.splice(p..p, chunk);
            }
            Mutation::Truncate(p) => bytes.truncate(at(p, len)),
            Mutation::Splice(o, from, p) => {
                let other = &corpus[o % corpus.len()];
                let from = at(from, other.len());
                let p = at(p, len);
                bytes.truncate(p);
                bytes.extend_from_slice(&other[from..]);
            }
            _ => {}
        }
    }
    bytes
}

/// Inputs for a target: mostly mutated corpus entries, sometimes plain random bytes.
fn inputs(corpus: Arc<Vec<Vec<u8>>>) -> impl Strategy<Value = Input> {
    let entries = corpus.len();
    let mutated = (0..entries, prop::collection::vec(mutation(), 0..6))
        .prop_map(move |(i, mutations)| Input(apply(&corpus, corpus[i].clone(), &mutations)));
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..512).prop_map(Input),
        6 => mutated,
    ]
}

/// Runs one fuzz target: its corpus first, then generated inputs. `check` panics (asserts) on a
/// property violation; a panic inside the code under test fails the same way.
pub(crate) fn run(target: &str, check: impl Fn(&[u8])) {
    let corpus = corpus(target);
    for (name, bytes) in &corpus {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(bytes)));
        if outcome.is_err() {
            panic!("fuzz target {target}: corpus entry {name} fails");
        }
    }
    let seeds = Arc::new(corpus.into_iter().map(|(_, bytes)| bytes).collect());
    let mut runner = TestRunner::new(config());
    if let Err(e) = runner.run(&inputs(seeds), |input| {
        check(&input.0);
        Ok(())
    }) {
        panic!("fuzz target {target}: {e}");
    }
}

/// The longest detail a refusal may carry: details reach logs, dead letters and API answers,
/// and must not grow with an attacker's input.
pub(crate) const MAX_DETAIL: usize = 1024;

#[test]
fn mutations_apply_anywhere() {
    let corpus = vec![b"abc".to_vec(), Vec::new()];
    let all = [
        Mutation::FlipBit(7, 0),
        Mutation::Interesting(1, 99),
        Mutation::Random(0, b'x'),
        Mutation::Token(100, 0),
        Mutation::Remove(2, 9),
        Mutation::Duplicate(0, 2),
        Mutation::Truncate(1000),
        Mutation::Splice(0, 1, 0),
    ];
    let expected: [&[u8]; 8] = [
        b"acc", b"a\x80c", b"xbc", b"{abc", b"ab", b"ababc", b"", b"bc",
    ];
    for (m, want) in all.iter().zip(expected) {
        assert_eq!(
            apply(&corpus, b"abc".to_vec(), std::slice::from_ref(m)),
            want,
            "{m:?}"
        );
    }
    for m in &all {
        // Nothing applies to an empty input except growth; nothing panics.
        apply(&corpus, Vec::new(), std::slice::from_ref(m));
    }
}
