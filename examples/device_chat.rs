//! The device side of HAT in a few lines: open the device package, connect to a cloud, stream a
//! reply. Start a cloud first:
//!
//! ```text
//! hat serve cloud --package artifacts/cloud --listen 127.0.0.1:7070
//! cargo run --release -p hat-examples --example device_chat -- artifacts/device 127.0.0.1:7070 "Why is the sky blue?"
//! ```

use std::io::Write;

use anyhow::{Context, Result};
use hat_runtime::{CloudOptions, DeviceRuntime, GenerateOptions, Mode};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: device_chat DEVICE_DIR CLOUD_ADDR PROMPT";
    let device_dir = args.next().context(usage)?;
    let cloud = args.next().context(usage)?;
    let prompt = args.next().context(usage)?;

    let device = DeviceRuntime::open(device_dir.as_ref())?;
    let mut session = device.connect(CloudOptions::new(cloud))?;
    let ids = device.prompt_ids(&prompt, true)?;
    let opts = GenerateOptions { max_tokens: 128, eos: device.eos_ids(), ..Default::default() };

    // Tokens arrive as the cloud verifies each draft; decode the growing reply and print the new part.
    let tokenizer = &device.package.tokenizer;
    let mut reply = Vec::new();
    let mut printed = 0;
    let gen = session.generate(&ids, &opts, Mode::Hat { draft_len: 4 }, |token| {
        reply.push(token);
        if let Ok(text) = tokenizer.decode(&reply, true) {
            if text.is_char_boundary(printed) && !text.ends_with('\u{fffd}') {
                print!("{}", &text[printed..]);
                let _ = std::io::stdout().flush();
                printed = text.len();
            }
        }
    })?;
    println!();
    eprintln!(
        "{} tokens in {} round trips ({:.2} per trip), {} bytes up, {} bytes down",
        gen.tokens.len(),
        gen.rounds + 1,
        gen.accept_len(),
        gen.traffic.bytes_up,
        gen.traffic.bytes_down
    );
    Ok(())
}
