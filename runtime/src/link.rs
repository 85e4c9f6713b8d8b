//! The device's end of a TCP connection to the cloud: length-delimited frames, byte counters, and an
//! optional emulated WAN. A writer thread and a reader thread keep the socket busy while the device
//! computes, so several frames can be in flight (pipelined prefill needs that).
//!
//! The emulated link serialises each frame at `mbps` in its direction (frames queue behind each
//! other, as on a real link) and then delays it by half the RTT, plus a random jitter of up to
//! `jitter` (frames still arrive in order, as over TCP). Uplink frames are held back before they
//! reach the socket; downlink frames are held back after they arrive.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::middle::Traffic;
use crate::protocol::{frame, LENGTH_PREFIX};
use crate::tls::{ClientTls, TlsFailure};

/// How long connecting, and a TLS handshake, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A slower link, emulated inside the device process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkEmulation {
    /// Bandwidth in each direction, megabits per second.
    pub mbps: f64,
    /// Round-trip time; each message is delayed by half of it.
    pub rtt: Duration,
    /// Extra one-way delay per frame, uniform in `0..=jitter`.
    pub jitter: Duration,
}

impl LinkEmulation {
    pub fn new(mbps: f64, rtt: Duration) -> Self {
        Self { mbps, rtt, jitter: Duration::ZERO }
    }

    fn transfer_time(&self, bytes: usize) -> Duration {
        if self.mbps <= 0.0 || !self.mbps.is_finite() {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(bytes as f64 * 8.0 / (self.mbps * 1e6))
    }
}

/// What the device has measured about its link to the cloud: round-trip time (cloud compute
/// excluded) and throughput each way.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkEstimate {
    pub rtt: Duration,
    pub up_mbps: f64,
    pub down_mbps: f64,
}

impl LinkEstimate {
    /// Seconds to move `bytes` up, or down, serialisation only.
    pub fn up_secs(&self, bytes: usize) -> f64 {
        bytes as f64 * 8.0 / (self.up_mbps * 1e6)
    }

    pub fn down_secs(&self, bytes: usize) -> f64 {
        bytes as f64 * 8.0 / (self.down_mbps * 1e6)
    }

    /// The slower direction's throughput: what the chunk-size table is looked up by.
    pub fn mbps(&self) -> f64 {
        self.up_mbps.min(self.down_mbps)
    }
}

/// Bytes written to and read from sockets, framing included.
#[derive(Debug, Default)]
pub struct Counters {
    pub up: AtomicU64,
    pub down: AtomicU64,
}

impl Counters {
    pub fn traffic(&self, reconnects: u32) -> Traffic {
        Traffic { bytes_up: self.up.load(Ordering::Relaxed), bytes_down: self.down.load(Ordering::Relaxed), reconnects }
    }
}

/// One direction of the emulated link: when it is next free, and when its last frame came out.
#[derive(Debug, Clone)]
struct Lane {
    busy_until: Instant,
    last_out: Instant,
    rng: rand::rngs::StdRng,
}

impl Lane {
    fn new(now: Instant, seed: u64) -> Self {
        use rand::SeedableRng;
        Self { busy_until: now, last_out: now, rng: rand::rngs::StdRng::seed_from_u64(seed) }
    }

    /// When a frame of `bytes` handed over at `at` comes out of the far end.
    fn schedule(&mut self, link: &LinkEmulation, at: Instant, bytes: usize) -> Instant {
        use rand::Rng;
        let start = at.max(self.busy_until);
        let done = start + link.transfer_time(bytes);
        self.busy_until = done;
        let jitter = if link.jitter.is_zero() { Duration::ZERO } else { link.jitter.mul_f64(self.rng.random::<f64>()) };
        // In order, as over TCP: a frame never overtakes the one before it.
        self.last_out = (done + link.rtt / 2 + jitter).max(self.last_out);
        self.last_out
    }
}

type Incoming = std::io::Result<(Vec<u8>, Instant)>;

#[derive(Debug)]
pub struct FramedConn {
    stream: TcpStream,
    to_writer: Option<Sender<(Vec<u8>, Instant)>>,
    from_reader: Receiver<Incoming>,
    /// A frame [`FramedConn::reply_ready`] took off the reader, with when the emulated link delivers it.
    peeked: Option<std::io::Result<(Vec<u8>, Instant)>>,
    link: Option<LinkEmulation>,
    up_lane: Lane,
    down_lane: Lane,
}

fn broken(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, msg.to_string())
}

impl FramedConn {
    /// Connects (trying each resolved address), shakes hands in TLS when `tls` is given, and starts
    /// the writer and reader threads.
    pub fn connect(
        addr: &str,
        link: Option<LinkEmulation>,
        max_frame: usize,
        counters: Arc<Counters>,
        tls: Option<&ClientTls>,
    ) -> std::io::Result<Self> {
        let mut last = None;
        let mut stream = None;
        for a in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = stream.ok_or_else(|| last.unwrap_or_else(|| std::io::Error::other("the address resolved to nothing")))?;
        stream.set_nodelay(true)?;
        let (mut r, mut w): (Box<dyn Read + Send>, Box<dyn Write + Send>) = match tls {
            Some(tls) => {
                let (r, w) = tls.handshake(addr, stream.try_clone()?, CONNECT_TIMEOUT)?;
                (Box::new(r), Box::new(w))
            }
            None => (Box::new(stream.try_clone()?), Box::new(stream.try_clone()?)),
        };

        let (to_writer, writer_rx) = mpsc::channel::<(Vec<u8>, Instant)>();
        let wc = counters.clone();
        let cut = stream.try_clone()?;
        std::thread::Builder::new().name("hat-link-writer".into()).spawn(move || {
            for (bytes, release) in writer_rx {
                let now = Instant::now();
                if release > now {
                    std::thread::sleep(release - now);
                }
                if w.write_all(&bytes).is_err() {
                    let _ = cut.shutdown(Shutdown::Both);
                    return;
                }
                wc.up.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
        })?;

        let (reader_tx, from_reader) = mpsc::channel::<Incoming>();
        std::thread::Builder::new().name("hat-link-reader".into()).spawn(move || loop {
            let got = read_frame(&mut r, max_frame).map(|body| {
                counters.down.fetch_add((LENGTH_PREFIX + body.len()) as u64, Ordering::Relaxed);
                (body, Instant::now())
            });
            let failed = got.is_err();
            if reader_tx.send(got).is_err() || failed {
                return;
            }
        })?;

        let now = Instant::now();
        Ok(Self {
            stream,
            to_writer: Some(to_writer),
            from_reader,
            peeked: None,
            link,
            up_lane: Lane::new(now, 1),
            down_lane: Lane::new(now, 2),
        })
    }

    /// Queues one frame; returns at once.
    pub fn send(&mut self, body: &[u8]) -> std::io::Result<()> {
        let bytes = frame(body);
        let now = Instant::now();
        let release = match &self.link {
            Some(l) => self.up_lane.schedule(l, now, bytes.len()),
            None => now,
        };
        let tx = self.to_writer.as_ref().ok_or_else(|| broken("connection closed"))?;
        tx.send((bytes, release)).map_err(|_| broken("the connection to the cloud is closed"))
    }

    /// The next frame body, after the emulated link would have delivered it.
    pub fn recv(&mut self, timeout: Duration) -> std::io::Result<Vec<u8>> {
        let (body, deliver) = match self.peeked.take() {
            Some(got) => got?,
            None => match self.from_reader.recv_timeout(timeout) {
                Ok(got) => self.delivery(got)?,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no reply within {timeout:?}")))
                }
                Err(RecvTimeoutError::Disconnected) => return Err(broken("the connection to the cloud is closed")),
            },
        };
        let now = Instant::now();
        if deliver > now {
            std::thread::sleep(deliver - now);
        }
        Ok(body)
    }

    /// Whether [`FramedConn::recv`] would return at once: a frame (or a failure) is in, and the
    /// emulated link has delivered it. Never blocks.
    pub fn reply_ready(&mut self) -> bool {
        if self.peeked.is_none() {
            match self.from_reader.try_recv() {
                Ok(got) => self.peeked = Some(self.delivery(got)),
                Err(std::sync::mpsc::TryRecvError::Empty) => return false,
                // recv reports it.
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return true,
            }
        }
        match &self.peeked {
            Some(Ok((_, deliver))) => *deliver <= Instant::now(),
            _ => true,
        }
    }

    /// When the emulated link hands over a frame the reader got at `arrived` (at once without one).
    fn delivery(&mut self, got: Incoming) -> std::io::Result<(Vec<u8>, Instant)> {
        let (body, arrived) = got?;
        let deliver = match &self.link {
            Some(l) => self.down_lane.schedule(l, arrived, LENGTH_PREFIX + body.len()),
            None => arrived,
        };
        Ok((body, deliver))
    }
}

impl Drop for FramedConn {
    /// The writer thread drains its queue (a final close message included) and then drops its
    /// handle; stopping the reader is enough here.
    fn drop(&mut self) {
        self.to_writer.take();
        let _ = self.stream.shutdown(Shutdown::Read);
    }
}

/// Reads one length-prefixed frame, refusing a length over `max_frame` before allocating.
pub fn read_frame(r: &mut impl Read, max_frame: usize) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; LENGTH_PREFIX];
    r.read_exact(&mut len)?;
    let n = u32::from_be_bytes(len) as usize;
    // A TLS record header (handshake or alert, version 3.x) read as a length: a TLS peer.
    if n > max_frame && (0x14..=0x17).contains(&len[0]) && len[1] == 0x03 && len[2] <= 0x04 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, TlsFailure::PeerSpeaksTls));
    }
    if n > max_frame {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("frame of {n} bytes is over the {max_frame}-byte limit")));
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body)?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_queue_frames_and_add_half_the_rtt() {
        let link = LinkEmulation::new(8.0, Duration::from_millis(40));
        let t0 = Instant::now();
        let mut lane = Lane::new(t0, 0);
        // 10 kB at 8 Mbps = 10 ms on the wire, then 20 ms of latency.
        let a = lane.schedule(&link, t0, 10_000);
        assert_eq!(a - t0, Duration::from_millis(30));
        // A second frame handed over at once waits for the first to leave the wire.
        let b = lane.schedule(&link, t0, 10_000);
        assert_eq!(b - t0, Duration::from_millis(40));
        // One handed over after the lane is idle again only pays its own time.
        let c = lane.schedule(&link, t0 + Duration::from_millis(100), 0);
        assert_eq!(c - t0, Duration::from_millis(120));
    }

    #[test]
    fn jitter_delays_within_bounds_and_keeps_order() {
        let link = LinkEmulation { mbps: 0.0, rtt: Duration::from_millis(20), jitter: Duration::from_millis(30) };
        let t0 = Instant::now();
        let mut lane = Lane::new(t0, 7);
        let mut prev = t0;
        let mut delays = Vec::new();
        for i in 0..200 {
            let at = t0 + Duration::from_millis(i * 100);
            let out = lane.schedule(&link, at, 100);
            assert!(out >= prev, "frames stay in order");
            let d = out - at;
            assert!(d >= Duration::from_millis(10) && d <= Duration::from_millis(40), "delay {d:?}");
            delays.push(d);
            prev = out;
        }
        let spread = *delays.iter().max().expect("delays") - *delays.iter().min().expect("delays");
        assert!(spread > Duration::from_millis(20), "jitter actually varies the delay: spread {spread:?}");
    }

    /// `reply_ready` says no while the reply is on the emulated link, yes once it is delivered, and
    /// the frame it peeked is the one `recv` returns.
    #[test]
    fn reply_ready_waits_for_the_emulated_delivery() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let echo = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let body = read_frame(&mut s, 1024).expect("frame");
            s.write_all(&frame(&body)).expect("echo");
        });
        let link = LinkEmulation::new(0.0, Duration::from_millis(200));
        let mut conn = FramedConn::connect(&addr, Some(link), 1024, Arc::new(Counters::default()), None).expect("connect");
        let sent = Instant::now();
        conn.send(b"ping").expect("send");
        assert!(!conn.reply_ready(), "ready before the request could even have left");
        while !conn.reply_ready() {
            assert!(sent.elapsed() < Duration::from_secs(5), "the echo never became ready");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(sent.elapsed() >= Duration::from_millis(200), "ready after {:?}, before a 200 ms round trip", sent.elapsed());
        let waited = Instant::now();
        assert_eq!(conn.recv(Duration::from_secs(1)).expect("recv"), b"ping");
        assert!(waited.elapsed() < Duration::from_millis(50), "recv waited {:?} for a delivered frame", waited.elapsed());
        echo.join().expect("echo thread");
    }

    #[test]
    fn oversized_length_prefix_is_refused_before_allocating() {
        let mut bytes: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        let err = read_frame(&mut bytes, 1024).expect_err("over the limit");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }
}
