//! Rebuilds a Hugging Face `tokenizer.json` from GGUF metadata (byte-level BPE, llama.cpp model
//! `gpt2`). Control tokens (token_type 3) are registered as special added tokens; without that,
//! `<|im_start|>` would be split into ordinary pieces and chat prompts would be garbage.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use hat_model::manifest::{SpecialToken, TokenizerInfo};
use serde_json::{json, Value as Json};

const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

pub fn build(md: &HashMap<String, Value>) -> Result<(String, TokenizerInfo), String> {
    let model = md.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).map(String::as_str).unwrap_or("");
    if model != "gpt2" {
        return Err(format!(
            "GGUF tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`); \
             split the Hugging Face directory of this model instead"
        ));
    }
    let tokens: Vec<String> = md
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .ok_or("GGUF has no tokenizer.ggml.tokens")?
        .iter()
        .map(|v| v.to_string().cloned().map_err(|_| "tokenizer.ggml.tokens holds a non-string".to_string()))
        .collect::<Result<_, _>>()?;
    let types: Vec<i64> = match md.get("tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok()) {
        Some(list) => list.iter().map(as_i64).collect::<Option<_>>().ok_or("tokenizer.ggml.token_type holds a non-integer")?,
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(format!("{} token types for {} tokens", types.len(), tokens.len()));
    }
    let merges: Vec<String> = md
        .get("tokenizer.ggml.merges")
        .and_then(|v| v.to_vec().ok())
        .ok_or("GGUF has no tokenizer.ggml.merges")?
        .iter()
        .map(|v| v.to_string().cloned().map_err(|_| "tokenizer.ggml.merges holds a non-string".to_string()))
        .collect::<Result<_, _>>()?;

    let vocab: serde_json::Map<String, Json> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let added: Vec<Json> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, ty))| **ty == TOKEN_TYPE_CONTROL || **ty == TOKEN_TYPE_USER_DEFINED)
        .map(|(id, (content, ty))| {
            json!({
                "id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": *ty == TOKEN_TYPE_CONTROL,
            })
        })
        .collect();

    let pre = md.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).map(String::as_str).unwrap_or("default");
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    // llama.cpp's `smollm`/`starcoder` pre-tokenizers split every digit on its own before GPT-2's regex.
    let pre_tokenizer = match pre {
        "smollm" | "starcoder" | "refact" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level],
        }),
        "gpt2" | "default" => byte_level.clone(),
        other => return Err(format!("GGUF pre-tokenizer `{other}` is not supported (supported: smollm, starcoder, gpt2)")),
    };
    let id_of = |key: &str| md.get(key).and_then(as_i64).and_then(|i| usize::try_from(i).ok()).filter(|&i| i < tokens.len());
    let special = |i: usize| SpecialToken { id: i as u32, content: tokens[i].clone() };
    let add_bos = md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
    let bos = id_of("tokenizer.ggml.bos_token_id").map(special);

    let mut post = vec![json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})];
    if let (true, Some(b)) = (add_bos, &bos) {
        post.push(json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b.content, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b.content, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b.content.clone(): {"id": b.content, "ids": [b.id], "tokens": [b.content]}},
        }));
    }
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "Sequence", "processors": post},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    });
    let text = serde_json::to_string(&tokenizer).map_err(|e| e.to_string())?;
    // Prove the result loads before anything is written.
    tokenizers::Tokenizer::from_bytes(text.as_bytes()).map_err(|e| format!("rebuilt tokenizer does not load: {e}"))?;
    let info = TokenizerInfo {
        file: "tokenizer.json".into(),
        chat_template: md.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned(),
        bos_token: bos,
        eos_tokens: id_of("tokenizer.ggml.eos_token_id").map(special).into_iter().collect(),
        pad_token: id_of("tokenizer.ggml.padding_token_id").map(special),
    };
    Ok((text, info))
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::I8(x) => Some(*x as i64),
        Value::I16(x) => Some(*x as i64),
        Value::I32(x) => Some(*x as i64),
        Value::I64(x) => Some(*x),
        other => other.to_u64().ok().and_then(|x| i64::try_from(x).ok()),
    }
}
