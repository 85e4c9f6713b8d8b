//! `hat profile`'s pipeline model against reality: on the real default model, over an emulated
//! 10 Mbps / 40 ms link, the TTFT the model predicts from profiled stage times tracks the TTFT
//! measured for the same chunk sizes. Alone in its test binary, so no other test competes for the CPU
//! while it times things.

use std::time::Instant;

use hat_profiles::{measure, ProfileOptions};
use hat_runtime::{Chunking, CloudOptions, CloudServer, GenerateOptions, LinkEmulation, Mode, ServerConfig};
use hat_tests::{long_prompt, open_default};

const PROMPT_LEN: usize = 600;

#[test]
fn predicted_ttft_tracks_measured_ttft() {
    let (device, cloud) = open_default();
    let server = CloudServer::start(&cloud, ServerConfig { log: false, ..Default::default() }, "127.0.0.1:0").expect("cloud");
    let mut opts = CloudOptions::new(server.local_addr().to_string());
    opts.link = Some(LinkEmulation::new(10.0, std::time::Duration::from_millis(40)));

    let popts = ProfileOptions { sizes: vec![16, 64, 256, 600], offsets: vec![0, 300], reps: 1, ..Default::default() };
    let profile = measure(&device, opts.clone(), "test", &popts, |_| {}).expect("profile");
    let link = profile.link;
    assert!((link.rtt_ms - 40.0).abs() < 15.0, "probed RTT {:.1} ms on a 40 ms link", link.rtt_ms);
    assert!(link.up_mbps > 7.0 && link.up_mbps < 13.0, "probed {:.1} Mbps up on a 10 Mbps link", link.up_mbps);

    let prompt = long_prompt(&device, PROMPT_LEN);
    let one = GenerateOptions { max_tokens: 1, ..Default::default() };
    let mut session = device.connect(opts).expect("connect");
    session.generate(&prompt[..32], &one, Mode::Hat { draft_len: 1 }, |_| {}).expect("warm-up");

    let mut rows = Vec::new();
    for chunk in [None, Some(32), Some(100), Some(256)] {
        session.set_chunking(chunk.map_or(Chunking::Whole, Chunking::Fixed));
        let t0 = Instant::now();
        let g = session.generate(&prompt, &one, Mode::Hat { draft_len: 1 }, |_| {}).expect("generate");
        let measured = g.ttft.as_secs_f64() * 1e3;
        assert!(t0.elapsed().as_secs_f64() * 1e3 >= measured);
        let predicted = profile.predict_ms(PROMPT_LEN, chunk, &link);
        println!("chunk {chunk:?}: predicted {predicted:.0} ms, measured {measured:.0} ms");
        rows.push((chunk, predicted, measured));
    }
    for (chunk, predicted, measured) in &rows {
        let err = (predicted - measured).abs() / measured;
        assert!(err < 0.35, "chunk {chunk:?}: predicted {predicted:.0} ms vs measured {measured:.0} ms ({:.0} % off)", err * 100.0);
    }
    // Where the model predicts a clear gain from chunking, the measurement shows one too.
    let whole = rows[0];
    let best = rows.iter().min_by(|a, b| a.1.total_cmp(&b.1)).expect("rows");
    if best.1 < 0.8 * whole.1 {
        assert!(
            best.2 < whole.2,
            "model predicted chunk {:?} beats one piece ({:.0} vs {:.0} ms); measured {:.0} vs {:.0}",
            best.0,
            best.1,
            whole.1,
            best.2,
            whole.2
        );
    }
}
