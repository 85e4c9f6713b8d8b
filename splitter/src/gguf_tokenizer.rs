//! Rebuilds a Hugging Face `tokenizer.json` from GGUF metadata: byte-level BPE (llama.cpp model
//! `gpt2`: SmolLM, Llama 3, Qwen) or SentencePiece BPE with byte fallback (model `llama`: Gemma,
//! Llama 2, Mistral). Control tokens (token_type 3) are registered as special added tokens; without
//! that, `<|im_start|>` would be split into ordinary pieces and chat prompts would be garbage.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use hat_model::manifest::{SpecialToken, TokenizerInfo};
use serde_json::{json, Value as Json};

const TOKEN_TYPE_NORMAL: i64 = 1;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// llama.cpp's pre-tokenizer regexes that hat rebuilds, by `tokenizer.ggml.pre`.
const LLAMA3_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub fn build(md: &HashMap<String, Value>) -> Result<(String, TokenizerInfo), String> {
    let model = md.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).map(String::as_str).unwrap_or("");
    if model != "gpt2" && model != "llama" {
        return Err(format!(
            "GGUF tokenizer model `{model}` is not supported (supported: gpt2, byte-level BPE; llama, SentencePiece); \
             split the Hugging Face directory of this model instead"
        ));
    }
    let tokens = string_list(md, "tokenizer.ggml.tokens")?;
    let types: Vec<i64> = match md.get("tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok()) {
        Some(list) => list.iter().map(as_i64).collect::<Option<_>>().ok_or("tokenizer.ggml.token_type holds a non-integer")?,
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(format!("{} token types for {} tokens", types.len(), tokens.len()));
    }
    let id_of = |key: &str| md.get(key).and_then(as_i64).and_then(|i| usize::try_from(i).ok()).filter(|&i| i < tokens.len());
    let special = |i: usize| SpecialToken { id: i as u32, content: tokens[i].clone() };
    let add_bos = md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
    let bos = id_of("tokenizer.ggml.bos_token_id").map(special);
    let bos_template = match (add_bos, &bos) {
        (true, Some(b)) => Some(json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b.content, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b.content, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b.content.clone(): {"id": b.content, "ids": [b.id], "tokens": [b.content]}},
        })),
        _ => None,
    };
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
    let vocab: serde_json::Map<String, Json> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let tokenizer = if model == "gpt2" {
        byte_level_bpe(md, vocab, added, bos_template)?
    } else {
        let scores: Vec<f32> = md
            .get("tokenizer.ggml.scores")
            .and_then(|v| v.to_vec().ok())
            .ok_or("GGUF has no tokenizer.ggml.scores")?
            .iter()
            .map(|v| v.to_f32().map_err(|_| "tokenizer.ggml.scores holds a non-float".to_string()))
            .collect::<Result<_, _>>()?;
        if scores.len() != tokens.len() {
            return Err(format!("{} token scores for {} tokens", scores.len(), tokens.len()));
        }
        let add_space = md.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.to_bool().ok()).unwrap_or(true);
        let unk = id_of("tokenizer.ggml.unknown_token_id").map(|i| tokens[i].clone());
        sentencepiece_bpe(&tokens, &types, &scores, vocab, added, bos_template, add_space, unk)
    };
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

/// Byte-level BPE with the merges the GGUF lists, and llama.cpp's pre-tokenizer of that name.
fn byte_level_bpe(
    md: &HashMap<String, Value>,
    vocab: serde_json::Map<String, Json>,
    added: Vec<Json>,
    bos: Option<Json>,
) -> Result<Json, String> {
    let merges = string_list(md, "tokenizer.ggml.merges")?;
    let pre = md.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).map(String::as_str).unwrap_or("default");
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let split_then_bytes = |regex: &str| {
        json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
            ],
        })
    };
    let pre_tokenizer = match pre {
        // llama.cpp's `smollm`/`starcoder` pre-tokenizers split every digit on its own before GPT-2's regex.
        "smollm" | "starcoder" | "refact" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level],
        }),
        "gpt2" | "default" => byte_level.clone(),
        "llama-bpe" | "llama3" => split_then_bytes(LLAMA3_SPLIT),
        "qwen2" => split_then_bytes(QWEN2_SPLIT),
        other => {
            return Err(format!("GGUF pre-tokenizer `{other}` is not supported (supported: smollm, starcoder, gpt2, llama-bpe, qwen2)"))
        }
    };
    let mut post = vec![json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})];
    post.extend(bos);
    Ok(json!({
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
    }))
}

/// SentencePiece BPE as llama.cpp runs it: spaces become `▁`, then adjacent pieces merge while
/// their concatenation is a token, highest score first; characters with no token fall back to
/// `<0xXX>` byte tokens. The GGUF carries scores, not merges, so the merges are derived the way
/// Hugging Face's converters derive them from a SentencePiece model: every split of a normal token
/// into two tokens, ranked by the token's score.
#[allow(clippy::too_many_arguments)]
fn sentencepiece_bpe(
    tokens: &[String],
    types: &[i64],
    scores: &[f32],
    vocab: serde_json::Map<String, Json>,
    added: Vec<Json>,
    bos: Option<Json>,
    add_space: bool,
    unk: Option<String>,
) -> Json {
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mergeable = |i: usize| types[i] == TOKEN_TYPE_NORMAL;
    let mut by_score: Vec<usize> = (0..tokens.len()).filter(|&i| mergeable(i)).collect();
    by_score.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut merges = Vec::new();
    for &id in &by_score {
        let piece = &tokens[id];
        let mut local: Vec<(usize, usize)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = (ids.get(&piece[..at])?, ids.get(&piece[at..])?);
                (mergeable(*l) && mergeable(*r)).then_some((*l, *r))
            })
            .collect();
        local.sort_unstable();
        merges.extend(local.into_iter().map(|(l, r)| json!([tokens[l], tokens[r]])));
    }
    let mut normalizer = vec![json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"})];
    let mut decoder = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space {
        normalizer.insert(0, json!({"type": "Prepend", "prepend": "\u{2581}"}));
        decoder.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizer},
        "pre_tokenizer": null,
        "post_processor": bos,
        "decoder": {"type": "Sequence", "decoders": decoder},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    })
}

/// The string array under `key`, or a one-line reason.
fn string_list(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>, String> {
    md.get(key)
        .and_then(|v| v.to_vec().ok())
        .ok_or_else(|| format!("GGUF has no {key}"))?
        .iter()
        .map(|v| v.to_string().cloned().map_err(|_| format!("{key} holds a non-string")))
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
    }

    fn metadata(model: &str, pre: &str, tokens: &[&str], merges: &[&str]) -> HashMap<String, Value> {
        HashMap::from([
            ("tokenizer.ggml.model".to_string(), Value::String(model.into())),
            ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
            ("tokenizer.ggml.tokens".to_string(), strings(tokens)),
            ("tokenizer.ggml.merges".to_string(), strings(merges)),
            ("tokenizer.ggml.scores".to_string(), Value::Array((0..tokens.len()).map(|i| Value::F32(-(i as f32))).collect())),
        ])
    }

    fn pieces(md: &HashMap<String, Value>, text: &str) -> Vec<String> {
        let (json, _) = build(md).expect("build");
        let t = tokenizers::Tokenizer::from_bytes(json.as_bytes()).expect("load");
        t.encode(text, false).expect("encode").get_tokens().to_vec()
    }

    /// Llama 3's pre-tokenizer keeps runs of up to three digits together, Qwen2's splits every digit.
    #[test]
    fn llama3_and_qwen2_pre_tokenizers_split_digits_their_way() {
        let tokens = ["1", "2", "3", "4", "5", "12", "123", "45"];
        let merges = ["1 2", "12 3", "4 5"];
        assert_eq!(pieces(&metadata("gpt2", "llama-bpe", &tokens, &merges), "12345"), ["123", "45"]);
        assert_eq!(pieces(&metadata("gpt2", "qwen2", &tokens, &merges), "12345"), ["1", "2", "3", "4", "5"]);
        let err = build(&metadata("gpt2", "deepseek-llm", &tokens, &merges)).expect_err("unknown pre-tokenizer");
        assert!(err.contains("`deepseek-llm` is not supported"), "{err}");
    }

    /// SentencePiece pieces merge by score (a higher-scored piece wins), spaces become `▁`, and a
    /// character without a piece falls back to its bytes.
    #[test]
    fn sentencepiece_merges_by_score_and_falls_back_to_bytes() {
        let mut tokens: Vec<String> =
            ["<unk>", "\u{2581}", "a", "b", "c", "ab", "bc", "\u{2581}a", "\u{2581}abc"].map(String::from).to_vec();
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let mut md = metadata("llama", "default", &refs, &[]);
        let mut types = vec![Value::I32(2)];
        types.extend((1..9).map(|_| Value::I32(1)));
        types.extend((0..256).map(|_| Value::I32(6)));
        md.insert("tokenizer.ggml.token_type".into(), Value::Array(types));
        md.insert("tokenizer.ggml.unknown_token_id".into(), Value::U32(0));
        md.insert("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false));
        // "ab" (score -5) outranks "bc" (-6), and "abc" is no piece: a|b|c -> ab|c.
        assert_eq!(pieces(&md, "abc"), ["ab", "c"]);
        assert_eq!(pieces(&md, "é"), ["<0xC3>", "<0xA9>"]);
        let (json, _) = build(&md).expect("build");
        let t = tokenizers::Tokenizer::from_bytes(json.as_bytes()).expect("load");
        let ids = t.encode("a b", false).expect("encode").get_ids().to_vec();
        assert_eq!(t.decode(&ids, false).expect("decode"), "a b", "{ids:?}");
    }
}
