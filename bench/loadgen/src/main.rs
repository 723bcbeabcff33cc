//! `keyward-loadgen`: open-loop load at a fixed rate over HTTP/1.1 keep-alive connections.
//!
//! Request `i` is due at `start + i / rate`; connection `i % connections` sends it at that time (or
//! as soon as it is free, if it is late), so a slow server makes latency grow instead of the rate
//! drop (no coordinated omission). Each request carries `Authorization: Bearer <token i % n>`.
//! Prints one JSON object: requests sent, 2xx, other statuses, errors, achieved rate, latency
//! percentiles in microseconds.
//!
//! Usage: keyward-loadgen --addr 127.0.0.1:10000 --path /v/x --rate 1500 --seconds 10
//!        [--connections 16] [--tokens FILE (one per line)] [--host HOST] [--body-bytes N]
//!        [--json-body FILE]
//!
//! `--body-bytes N`: POST a form body of N bytes (`amount=1&currency=usd&description=xxx…`), as a
//! payment to a target priced from its body; `--json-body FILE`: POST that file as
//! `application/json` (a model call); otherwise GET. Answers carry `content-length` or are chunked.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Opts {
    addr: String,
    path: String,
    host: String,
    rate: f64,
    seconds: f64,
    connections: usize,
    tokens: Vec<String>,
    /// A body to POST (`None`: GET).
    body: Option<String>,
    content_type: &'static str,
}

fn opts() -> Result<Opts, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |k: &str| args.iter().position(|a| a == k).and_then(|i| args.get(i + 1)).cloned();
    let num = |k: &str, d: f64| -> Result<f64, String> { get(k).map_or(Ok(d), |v| v.parse().map_err(|_| format!("{k}: not a number"))) };
    let tokens = match get("--tokens") {
        Some(f) => std::fs::read_to_string(&f).map_err(|e| format!("{f}: {e}"))?.lines().filter(|l| !l.is_empty()).map(str::to_string).collect(),
        None => Vec::new(),
    };
    Ok(Opts {
        addr: get("--addr").ok_or("--addr is required")?,
        path: get("--path").unwrap_or_else(|| "/".into()),
        host: get("--host").unwrap_or_else(|| "bench".into()),
        rate: num("--rate", 1000.0)?,
        seconds: num("--seconds", 10.0)?,
        connections: num("--connections", 16.0)? as usize,
        tokens,
        body: match get("--json-body") {
            Some(f) => Some(std::fs::read_to_string(&f).map_err(|e| format!("{f}: {e}"))?),
            None => get("--body-bytes").map(|n| n.parse::<usize>().map_err(|_| "--body-bytes: not a number".to_string())).transpose()?.map(|n| {
                let mut b = String::from("amount=1&currency=usd&description=");
                while b.len() < n {
                    b.push('x');
                }
                b
            }),
        },
        content_type: if get("--json-body").is_some() { "application/json" } else { "application/x-www-form-urlencoded" },
    })
}

#[derive(Default)]
struct Tally {
    ok: u64,
    other: u64,
    errors: u64,
    latencies_us: Vec<u64>,
}

/// Read a chunked body (and its trailers, if any) to its end.
fn read_chunked(r: &mut BufReader<TcpStream>) -> std::io::Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16).map_err(|_| std::io::Error::other("bad chunk size"))?;
        if size == 0 {
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                    return Ok(());
                }
            }
        }
        let mut chunk = vec![0u8; size + 2];
        r.read_exact(&mut chunk)?;
    }
}

/// Read one response; returns its status. A body carries content-length or is chunked.
fn read_response(r: &mut BufReader<TcpStream>) -> std::io::Result<u16> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| std::io::Error::other("bad status line"))?;
    let mut len = 0usize;
    let mut chunked = false;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("connection closed"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
            if k.eq_ignore_ascii_case("transfer-encoding") && v.trim().eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    if chunked {
        read_chunked(r)?;
        return Ok(status);
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(status)
}

fn connect(addr: &str) -> std::io::Result<(TcpStream, BufReader<TcpStream>)> {
    let s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let r = BufReader::new(s.try_clone()?);
    Ok((s, r))
}

fn worker(o: Arc<Opts>, k: usize, start: Instant, total: u64) -> Tally {
    let mut t = Tally::default();
    let mut conn = connect(&o.addr).ok();
    let mut i = k as u64;
    while i < total {
        let due = start + Duration::from_secs_f64(i as f64 / o.rate);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let token = o.tokens.get(i as usize % o.tokens.len().max(1)).map(String::as_str).unwrap_or("");
        let method = if o.body.is_some() { "POST" } else { "GET" };
        let mut req = format!("{method} {} HTTP/1.1\r\nHost: {}\r\n", o.path, o.host);
        if !token.is_empty() {
            req.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        if let Some(b) = &o.body {
            req.push_str(&format!("Content-Type: {}\r\nContent-Length: {}\r\n\r\n{b}", o.content_type, b.len()));
        } else {
            req.push_str("\r\n");
        }
        let res = match conn.as_mut() {
            Some((s, r)) => s.write_all(req.as_bytes()).and_then(|_| read_response(r)),
            None => Err(std::io::Error::other("not connected")),
        };
        match res {
            Ok(status) => {
                t.latencies_us.push(due.elapsed().as_micros() as u64);
                if (200..300).contains(&status) {
                    t.ok += 1;
                } else {
                    t.other += 1;
                }
            }
            Err(_) => {
                t.errors += 1;
                conn = connect(&o.addr).ok();
            }
        }
        i += o.connections as u64;
    }
    t
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied().unwrap_or(0)
}

fn main() {
    let o = match opts() {
        Ok(o) => Arc::new(o),
        Err(e) => {
            eprintln!("keyward-loadgen: {e}");
            std::process::exit(2);
        }
    };
    let total = (o.rate * o.seconds).round() as u64;
    let start = Instant::now() + Duration::from_millis(50);
    let handles: Vec<_> = (0..o.connections)
        .map(|k| {
            let o = o.clone();
            std::thread::spawn(move || worker(o, k, start, total))
        })
        .collect();
    let mut all = Tally::default();
    for h in handles {
        if let Ok(t) = h.join() {
            all.ok += t.ok;
            all.other += t.other;
            all.errors += t.errors;
            all.latencies_us.extend(t.latencies_us);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.latencies_us.sort_unstable();
    let l = &all.latencies_us;
    println!(
        "{{\"requests\":{total},\"ok\":{},\"other_status\":{},\"errors\":{},\"rate\":{:.1},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"max_us\":{}}}",
        all.ok,
        all.other,
        all.errors,
        (all.ok + all.other) as f64 / elapsed,
        pct(l, 50.0),
        pct(l, 90.0),
        pct(l, 99.0),
        pct(l, 100.0)
    );
}
