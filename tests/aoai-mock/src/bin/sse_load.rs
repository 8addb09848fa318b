//! sse-load: opens N concurrent streamed chat completions against one HTTP/1.1 address and
//! reports how many completed (status 200, `data: [DONE]` seen, then the end of the body), the
//! time to the first `data:` byte (p50/p99) and the wall time. Used by `load-tests/sse.sh`;
//! one current-thread runtime, so it costs one core at most (the direct-to-mock row shows
//! whether it keeps up).
//!
//! Prints one line: `streams=N completed=N failed=N ttft_p50_ms=F ttft_p99_ms=F wall_s=F`.

#![forbid(unsafe_code)]

use clap::Parser;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser, Debug)]
#[command(name = "sse-load")]
struct Cli {
    /// host:port (loopback) to connect to.
    #[arg(long)]
    addr: String,
    /// Request path and query.
    #[arg(long)]
    path: String,
    /// Concurrent streams.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Spread the connects evenly over this many milliseconds (a backlog-friendly ramp).
    #[arg(long, default_value_t = 1000)]
    ramp_ms: u64,
    /// Extra request header lines (`name: value`), repeatable.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Give up on a stream after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
}

const BODY: &str =
    r#"{"messages":[{"role":"user","content":"Say hello."}],"max_tokens":32,"stream":true}"#;

#[derive(Debug)]
enum Outcome {
    Completed { ttft: Duration },
    Failed,
}

/// Whether `needle` occurs in `tail ++ chunk` (tail: the previous read's last bytes).
fn seen(tail: &[u8], chunk: &[u8], needle: &[u8]) -> bool {
    let mut joined = Vec::with_capacity(tail.len() + chunk.len());
    joined.extend_from_slice(tail);
    joined.extend_from_slice(chunk);
    memfind(&joined, needle)
}

fn memfind(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

async fn one(addr: String, request: std::sync::Arc<Vec<u8>>) -> Outcome {
    let Ok(mut s) = TcpStream::connect(&addr).await else {
        return Outcome::Failed;
    };
    let _ = s.set_nodelay(true);
    let start = Instant::now();
    if s.write_all(&request).await.is_err() {
        return Outcome::Failed;
    }
    let mut buf = vec![0u8; 16 * 1024];
    let mut tail: Vec<u8> = Vec::new();
    let mut head_checked = false;
    let mut ttft = None;
    let mut done = false;
    let mut ended = false;
    loop {
        let n = match s.read(&mut buf).await {
            // The end of a close-delimited body, or of the connection after the last chunk.
            Ok(0) => {
                ended = done;
                break;
            }
            Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        if !head_checked {
            if !chunk.starts_with(b"HTTP/1.1 200") {
                return Outcome::Failed;
            }
            head_checked = true;
        }
        if ttft.is_none() && seen(&tail, chunk, b"data:") {
            ttft = Some(start.elapsed());
        }
        if !done && seen(&tail, chunk, b"data: [DONE]") {
            done = true;
        }
        if done && seen(&tail, chunk, b"\r\n0\r\n\r\n") {
            ended = true;
            break;
        }
        let keep = chunk.len().min(16);
        tail.clear();
        tail.extend_from_slice(&chunk[chunk.len() - keep..]);
    }
    match (ttft, done && ended) {
        (Some(ttft), true) => Outcome::Completed { ttft },
        _ => Outcome::Failed,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn main() {
    let cli = Cli::parse();
    let mut req = format!(
        "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        cli.path,
        cli.addr,
        BODY.len()
    );
    for h in &cli.headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.push_str(BODY);
    let request = std::sync::Arc::new(req.into_bytes());
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sse-load: cannot start the runtime: {e}");
            std::process::exit(2);
        }
    };
    let timeout = Duration::from_secs(cli.timeout_s);
    let (ttfts, failed, wall) = rt.block_on(async move {
        let start = Instant::now();
        let gap = Duration::from_micros(cli.ramp_ms * 1000 / cli.streams.max(1) as u64);
        let mut tasks = Vec::with_capacity(cli.streams);
        for i in 0..cli.streams {
            let at = start + gap * i as u32;
            let addr = cli.addr.clone();
            let request = request.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                tokio::time::timeout(timeout, one(addr, request))
                    .await
                    .unwrap_or(Outcome::Failed)
            }));
        }
        let mut ttfts = Vec::with_capacity(tasks.len());
        let mut failed = 0usize;
        for t in tasks {
            match t.await {
                Ok(Outcome::Completed { ttft }) => ttfts.push(ttft),
                _ => failed += 1,
            }
        }
        (ttfts, failed, start.elapsed())
    });
    let mut sorted = ttfts;
    sorted.sort();
    println!(
        "streams={} completed={} failed={} ttft_p50_ms={:.1} ttft_p99_ms={:.1} wall_s={:.2}",
        cli.streams,
        sorted.len(),
        failed,
        percentile(&sorted, 0.50),
        percentile(&sorted, 0.99),
        wall.as_secs_f64()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_needle_across_two_reads() {
        assert!(seen(b"xx data: [DO", b"NE]\n\n", b"data: [DONE]"));
        assert!(!seen(b"", b"data: [DON", b"data: [DONE]"));
    }

    #[test]
    fn percentiles_of_sorted_durations() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&d, 0.5), 50.0);
        assert_eq!(percentile(&d, 0.99), 99.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
