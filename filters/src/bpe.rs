//! Exact BPE token counts in a compact form: about 4 MiB for o200k_base and 2 MiB for
//! cl100k_base, where `bpe-openai`'s tables (three Aho-Corasick automata per encoding) held
//! ≈ 115 MiB for the two.
//!
//! - The rank files are OpenAI's (`data/*.tiktoken.gz`, the same files `bpe-openai` and
//!   `tiktoken` ship), read once per encoding on first use: every token's bytes in one buffer,
//!   their offsets, and an open-addressing table from bytes to rank.
//! - Text is split by the encoding's pre-tokenizer regex, which `bpe-openai`'s own
//!   [`Tokenizer`] applies (built over a 256-token byte dictionary, so without its tables).
//! - Each piece is counted by tiktoken's rule: a piece that is a token is one; otherwise its
//!   bytes are merged pairwise, lowest rank first (the leftmost of equal ranks), until no
//!   adjacent pair is a token. Short pieces by a scan, long ones with a heap (n log n: a long
//!   run of letters without spaces cannot make it quadratic).
//!
//! `tests::counts_equal_bpe_openai` is the oracle test against the crate this replaces.

use std::collections::BinaryHeap;
use std::hash::BuildHasher;
use std::sync::OnceLock;

use base64::Engine;
use bpe_openai::byte_pair_encoding::BytePairEncoding;
use bpe_openai::Tokenizer;

use crate::estimate::Encoding;

const NONE: u32 = u32::MAX;
/// Pieces up to this many bytes are merged by a scan; longer ones with a heap.
const SCAN_MAX: usize = 64;

/// One encoding's ranks and pre-tokenizer.
pub struct Bpe {
    /// Every token's bytes, by rank.
    bytes: Vec<u8>,
    /// `starts[r]..starts[r + 1]` are rank r's bytes.
    starts: Vec<u32>,
    /// Open addressing: a rank, or [`NONE`]; the length is a power of two.
    slots: Vec<u32>,
    hasher: foldhash::fast::FixedState,
    split: Tokenizer,
}

impl std::fmt::Debug for Bpe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bpe")
            .field("tokens", &(self.starts.len() - 1))
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// The encoding's tables, read on first use (≈ 50–100 ms for o200k_base).
pub fn get(encoding: Encoding) -> &'static Bpe {
    static O200K: OnceLock<Bpe> = OnceLock::new();
    static CL100K: OnceLock<Bpe> = OnceLock::new();
    match encoding {
        Encoding::O200k => O200K.get_or_init(|| {
            Bpe::from_gz(
                include_bytes!("../data/o200k_base.tiktoken.gz"),
                &O200K_PATTERNS.join("|"),
            )
            .expect("the embedded o200k_base file is valid")
        }),
        Encoding::Cl100k => CL100K.get_or_init(|| {
            Bpe::from_gz(
                include_bytes!("../data/cl100k_base.tiktoken.gz"),
                CL100K_PATTERN,
            )
            .expect("the embedded cl100k_base file is valid")
        }),
    }
}

/// tiktoken's o200k_base pattern as `bpe-openai` writes it: the negative look-ahead
/// `\s+(?!\S)` becomes the look-ahead pattern `\s+\s` whose last character is dropped.
const O200K_PATTERNS: [&str; 6] = [
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "\\p{N}{1,3}",
    " ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*",
    "\\s*[\\r\\n]+",
    "\\s+$",
];
const CL100K_PATTERN: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+$";

impl Bpe {
    /// From a gzip'd `.tiktoken` file (`base64 rank` lines, ranks 0, 1, 2, … in order) and
    /// the encoding's main pre-tokenizer pattern.
    pub fn from_gz(gz: &[u8], pattern: &str) -> Result<Bpe, String> {
        use std::io::BufRead;
        // Read line by line into buffers sized from the compressed file (the token bytes are
        // about its size, the tokens about an eighth of it): nothing large is allocated only
        // to be freed, so reading leaves no freed memory behind in the allocator.
        let mut lines = std::io::BufReader::new(flate2::read::GzDecoder::new(gz));
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut bytes = Vec::with_capacity(gz.len());
        let mut starts = Vec::with_capacity(gz.len() / 8 + 1);
        starts.push(0u32);
        let mut line = String::new();
        for i in 0.. {
            line.clear();
            let n = lines
                .read_line(&mut line)
                .map_err(|e| format!("rank file: {e}"))?;
            if n == 0 {
                break;
            }
            let (token, rank) = line
                .trim_end_matches('\n')
                .split_once(' ')
                .ok_or_else(|| format!("rank file line {}: no rank", i + 1))?;
            if rank.parse::<usize>().ok() != Some(i) {
                return Err(format!(
                    "rank file line {}: rank {rank} out of order",
                    i + 1
                ));
            }
            b64.decode_vec(token, &mut bytes)
                .map_err(|e| format!("rank file line {}: {e}", i + 1))?;
            starts.push(bytes.len() as u32);
        }
        bytes.shrink_to_fit();
        let n = starts.len() - 1;
        let mut bpe = Bpe {
            bytes,
            starts,
            slots: vec![NONE; (2 * n).next_power_of_two()],
            hasher: foldhash::fast::FixedState::with_seed(0x5eed),
            split: Tokenizer::new_lookahead(
                BytePairEncoding::from_dictionary((0..=255u8).map(|b| vec![b]), None),
                &[(pattern, false), ("\\s+\\s", true), ("\\s+", false)],
                false,
            )
            .map_err(|e| format!("pre-tokenizer: {e}"))?,
        };
        for r in 0..n as u32 {
            let mut i = bpe.slot(bpe.token(r));
            while bpe.slots[i] != NONE {
                if bpe.token(bpe.slots[i]) == bpe.token(r) {
                    return Err(format!("rank {r}: a duplicate token"));
                }
                i = (i + 1) & (bpe.slots.len() - 1);
            }
            bpe.slots[i] = r;
        }
        Ok(bpe)
    }

    /// Bytes held by the tables (for the README's figures).
    pub fn table_bytes(&self) -> usize {
        self.bytes.len() + 4 * (self.starts.len() + self.slots.len())
    }

    fn token(&self, rank: u32) -> &[u8] {
        let r = rank as usize;
        &self.bytes[self.starts[r] as usize..self.starts[r + 1] as usize]
    }

    fn slot(&self, piece: &[u8]) -> usize {
        self.hasher.hash_one(piece) as usize & (self.slots.len() - 1)
    }

    /// The rank of a token, or [`NONE`].
    fn rank(&self, piece: &[u8]) -> u32 {
        let mut i = self.slot(piece);
        loop {
            let r = self.slots[i];
            if r == NONE || self.token(r) == piece {
                return r;
            }
            i = (i + 1) & (self.slots.len() - 1);
        }
    }

    /// Tokens of `text` (pre-tokenized, then each piece by BPE).
    pub fn count(&self, text: &str) -> usize {
        self.split
            .split(text)
            .map(|piece| self.count_piece(piece.as_bytes()))
            .sum()
    }

    /// Like [`Bpe::count`], but pieces longer than [`SCAN_MAX`] (long runs without a space:
    /// base64, hex — ≈ 0.5 µs a byte with the heap) are counted only while `long_budget`
    /// bytes last; the bytes of those beyond it are returned as the second value, for the
    /// caller to estimate. Every realistic prompt stays exact; a pathological one cannot
    /// hold a worker for long.
    pub fn count_within(&self, text: &str, long_budget: &mut usize) -> (usize, usize) {
        let (mut tokens, mut loose) = (0, 0);
        for piece in self.split.split(text) {
            let p = piece.as_bytes();
            if p.len() > SCAN_MAX && self.rank(p) == NONE {
                if p.len() > *long_budget {
                    loose += p.len();
                    continue;
                }
                *long_budget -= p.len();
            }
            tokens += self.count_piece(p);
        }
        (tokens, loose)
    }

    /// Tokens of one piece of the pre-tokenizer's split.
    pub fn count_piece(&self, piece: &[u8]) -> usize {
        match piece.len() {
            0 => 0,
            1 => 1,
            _ if self.rank(piece) != NONE => 1,
            n if n <= SCAN_MAX => self.merge_scan(piece),
            _ => self.merge_heap(piece),
        }
    }

    /// tiktoken's `_byte_pair_merge`: parts as (start, rank of the part merged with the next).
    fn merge_scan(&self, piece: &[u8]) -> usize {
        let mut parts: Vec<(usize, u32)> = Vec::with_capacity(piece.len() + 1);
        for i in 0..piece.len() - 1 {
            parts.push((i, self.rank(&piece[i..i + 2])));
        }
        parts.push((piece.len() - 1, NONE));
        parts.push((piece.len(), NONE));
        // The rank of part i merged with part i + 1 (after part i + 1 absorbed i + 2).
        let pair = |parts: &[(usize, u32)], i: usize| match parts.get(i + 3) {
            Some(&(end, _)) => self.rank(&piece[parts[i].0..end]),
            None => NONE,
        };
        loop {
            let mut min = (NONE, 0);
            for (i, &(_, r)) in parts[..parts.len() - 1].iter().enumerate() {
                if r < min.0 {
                    min = (r, i);
                }
            }
            if min.0 == NONE {
                return parts.len() - 1;
            }
            let i = min.1;
            if i > 0 {
                parts[i - 1].1 = pair(&parts, i - 1);
            }
            parts[i].1 = pair(&parts, i);
            parts.remove(i + 1);
        }
    }

    /// The same merges with a heap of (rank, start) and the parts as a linked list: each merge
    /// costs log n; an entry whose part is gone or whose pair changed rank is skipped when
    /// popped (a pair that changed but kept its rank is the current pair: merging it is right).
    fn merge_heap(&self, piece: &[u8]) -> usize {
        let n = piece.len();
        // Part i (a start offset) ends at next[i]; prev[i] is the previous part's start;
        // pair[i] is the rank of part i merged with the next part (NONE: none, or i is gone).
        let mut next: Vec<u32> = (1..=n as u32).collect();
        let mut prev: Vec<u32> = (0..n as u32).map(|i| i.wrapping_sub(1)).collect();
        let mut pair: Vec<u32> = vec![NONE; n];
        let mut heap = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            pair[i] = self.rank(&piece[i..i + 2]);
            if pair[i] != NONE {
                heap.push(std::cmp::Reverse((pair[i], i as u32)));
            }
        }
        let rank_of = |start: u32, next: &[u32]| -> u32 {
            let mid = next[start as usize];
            if mid as usize >= n {
                return NONE;
            }
            self.rank(&piece[start as usize..next[mid as usize] as usize])
        };
        let mut parts = n;
        while let Some(std::cmp::Reverse((r, i))) = heap.pop() {
            if pair[i as usize] != r {
                continue;
            }
            let j = next[i as usize];
            pair[j as usize] = NONE;
            next[i as usize] = next[j as usize];
            if (next[i as usize] as usize) < n {
                prev[next[i as usize] as usize] = i;
            }
            parts -= 1;
            pair[i as usize] = rank_of(i, &next);
            if pair[i as usize] != NONE {
                heap.push(std::cmp::Reverse((pair[i as usize], i)));
            }
            let p = prev[i as usize];
            if p != u32::MAX {
                pair[p as usize] = rank_of(p, &next);
                if pair[p as usize] != NONE {
                    heap.push(std::cmp::Reverse((pair[p as usize], p)));
                }
            }
        }
        parts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        let mut texts: Vec<String> = [
            "Hello, world!",
            "The quick brown fox jumps over the lazy dog. It's 2026; we're here.",
            "  leading and trailing spaces   \n\n\tand tabs\r\n",
            "naïve café — “quotes” and ‘apostrophes’, déjà vu",
            "数据中心的负载均衡器在多个区域之间分配请求。",
            "Привет, как дела? Всё хорошо.",
            "fn main() { let x = vec![1, 2, 3]; println!(\"{:?}\", x); }",
            "12345678901234567890 3.14159 1e-10 0xdeadbeef",
            "emoji 😀🚀👍🏽 and ZWJ 👨‍👩‍👧‍👦",
            "https://contoso-eastus.openai.azure.com/openai/deployments/gpt-4o/chat?api-version=2024-10-21",
            "",
            " ",
            "\n",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Long runs: one piece of thousands of bytes (the heap path), mixed long text.
        texts.push("abcdefghij".repeat(400));
        texts.push("aGVsbG8gd29ybGQ=".repeat(300));
        texts.push(" ".repeat(3000) + "x");
        texts.push(texts[..10].join(" ").repeat(20));
        texts
    }

    #[test]
    fn counts_equal_bpe_openai() {
        for (encoding, oracle) in [
            (Encoding::O200k, bpe_openai::o200k_base()),
            (Encoding::Cl100k, bpe_openai::cl100k_base()),
        ] {
            let bpe = get(encoding);
            for t in corpus() {
                assert_eq!(
                    bpe.count(&t),
                    oracle.count(t.as_str()),
                    "{encoding:?}: {:?}",
                    t.chars().take(60).collect::<String>()
                );
            }
        }
    }

    #[test]
    fn the_scan_and_the_heap_merge_alike() {
        // Pseudo-random byte strings over a small alphabet (many merges) and over all bytes.
        let bpe = get(Encoding::O200k);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 2..=SCAN_MAX {
            for alphabet in [
                b"ab ".as_slice(),
                b"etaoin shrdlu",
                b"\x00\xff\xe4\xb8\x80a",
            ] {
                let piece: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        alphabet[(x % alphabet.len() as u64) as usize]
                    })
                    .collect();
                assert_eq!(
                    bpe.merge_scan(&piece),
                    bpe.merge_heap(&piece),
                    "{:?}",
                    String::from_utf8_lossy(&piece)
                );
            }
        }
    }

    #[test]
    fn known_counts_and_table_sizes() {
        let o = get(Encoding::O200k);
        assert_eq!(o.count("Hello, world!"), 4);
        assert_eq!(o.count_piece(b" hello"), 1);
        assert_eq!(o.starts.len() - 1, 199_998);
        assert!(o.table_bytes() < 6 << 20, "{} bytes", o.table_bytes());
        let c = get(Encoding::Cl100k);
        assert_eq!(c.starts.len() - 1, 100_256);
        assert!(c.table_bytes() < 4 << 20, "{} bytes", c.table_bytes());
    }

    #[test]
    fn a_damaged_rank_file_is_refused() {
        use std::io::Write;
        let gz = |text: &str| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(text.as_bytes()).unwrap();
            e.finish().unwrap()
        };
        for (text, want) in [
            ("YQ== 0\nYg== 2\n", "rank 2 out of order"),
            ("YQ== 0\nYQ== 1\n", "duplicate"),
            ("YQ==\n", "no rank"),
            ("!!! 0\n", "line 1"),
        ] {
            let err = Bpe::from_gz(&gz(text), CL100K_PATTERN).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}

#[cfg(test)]
mod memory {
    fn rss_kib() -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// `cargo test -p filters --release --lib -- --ignored --nocapture bpe_memory`
    #[test]
    #[ignore]
    fn bpe_memory() {
        let a = rss_kib();
        let t = std::time::Instant::now();
        let o = super::get(crate::estimate::Encoding::O200k);
        let b = rss_kib();
        println!(
            "o200k: {} KiB RSS, tables {} KiB, {:?}",
            b - a,
            o.table_bytes() / 1024,
            t.elapsed()
        );
        let t = std::time::Instant::now();
        let n = o.count(&"The quick brown fox jumps over the lazy dog. ".repeat(2000));
        let c = rss_kib();
        println!(
            "first count ({n} tokens): +{} KiB, {:?}",
            c - b,
            t.elapsed()
        );
        let t = std::time::Instant::now();
        let c100 = super::get(crate::estimate::Encoding::Cl100k);
        println!(
            "cl100k: {} KiB RSS, tables {} KiB, {:?}",
            rss_kib() - c,
            c100.table_bytes() / 1024,
            t.elapsed()
        );
    }
}
