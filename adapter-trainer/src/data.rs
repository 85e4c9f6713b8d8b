//! Training text: a plain-text file (documents separated by blank lines), or JSON lines with `text`
//! or chat `messages`. Also the prompts for self-distillation: the file's own prompts, or the set
//! the project ships (`prompts/self-distill.txt`, written for hat), and held-out prompts for
//! evaluation (`prompts/heldout.txt`).

use std::path::Path;

use hat_runtime::chat::render_conversation;
use hat_runtime::DevicePackage;

use crate::error::{Result, TrainError};

pub const SHIPPED_PROMPTS: &str = include_str!("../prompts/self-distill.txt");
pub const HELDOUT_PROMPTS: &str = include_str!("../prompts/heldout.txt");
/// Prompts the model invented (`invent_prompts`, seed 5) that no training set holds: held out like
/// `heldout.txt`, to tell how far the head's acceptance on written prompts is a matter of kind.
pub const HELDOUT_INVENTED_PROMPTS: &str = include_str!("../prompts/heldout-invented.txt");

/// Every held-out prompt, written and invented: what no training set may hold.
pub fn held_out_prompts() -> std::collections::HashSet<String> {
    prompt_lines(HELDOUT_PROMPTS).into_iter().chain(prompt_lines(HELDOUT_INVENTED_PROMPTS)).collect()
}

/// Words that say what kind of request a prompt is, not what it is about.
const GLUE: &[&str] = &[
    "about", "could", "does", "explain", "from", "give", "have", "help", "into", "like", "make", "short", "should", "some", "tell", "that",
    "their", "them", "they", "this", "what", "when", "where", "which", "will", "with", "would", "write", "your",
];

/// Lower-cased words of four letters or more, glue words left out: what a prompt is about.
fn subject_words(text: &str) -> std::collections::HashSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() >= 4)
        .map(str::to_lowercase)
        .filter(|w| !GLUE.contains(&w.as_str()))
        .collect()
}

/// Whether a prompt is on the subject of a held-out one: it shares at least two subject words with
/// it, and at least 60% of the shorter prompt's. Invented prompts that are get dropped, so a
/// held-out topic does not come back in other words ("Write a poem about the moon at night").
pub fn near_held_out(prompt: &str) -> bool {
    // The held-out prompts' subjects, worked out once: this runs on every invented message.
    static HELD_OUT: std::sync::OnceLock<Vec<std::collections::HashSet<String>>> = std::sync::OnceLock::new();
    let held_out = HELD_OUT.get_or_init(|| held_out_prompts().iter().map(|h| subject_words(h)).collect());
    let mine = subject_words(prompt);
    held_out.iter().any(|theirs| {
        let shared = mine.intersection(theirs).count();
        shared >= 2 && shared as f64 >= 0.6 * mine.len().min(theirs.len()) as f64
    })
}

/// One training example, before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// Text trained on as it is.
    Text(String),
    /// A chat conversation, rendered with the model's template.
    Chat(Vec<(String, String)>),
}

impl Example {
    /// The first user turn (or the start of the text), used as a self-distillation prompt.
    pub fn prompt(&self) -> String {
        match self {
            Example::Text(t) => t.lines().next().unwrap_or_default().to_string(),
            Example::Chat(m) => m.iter().find(|(r, _)| r == "user").map(|(_, c)| c.clone()).unwrap_or_default(),
        }
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::BadData { path: path.to_path_buf(), reason: reason.into() }
}

/// A `--data` file's text.
fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| bad(path, format!("cannot read: {e}")))
}

/// JSON lines are recognised by a first non-empty line that starts with `{`.
fn is_jsonl(text: &str) -> bool {
    text.lines().find(|l| !l.trim().is_empty()).is_some_and(|l| l.trim_start().starts_with('{'))
}

/// Reads `--data`.
pub fn read_data(path: &Path) -> Result<Vec<Example>> {
    let text = read_text(path)?;
    if text.trim().is_empty() {
        return Err(bad(path, "the file is empty"));
    }
    let examples = if is_jsonl(&text) { read_jsonl(path, &text)? } else { read_plain(&text) };
    if examples.is_empty() {
        return Err(bad(path, "no examples found"));
    }
    Ok(examples)
}

/// Prompts for self-distillation from a `--data` file: JSON lines give each example's first user
/// turn (or its text's first line); plain text gives one prompt per non-empty line.
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = read_text(path)?;
    let prompts: Vec<String> = if is_jsonl(&text) {
        read_jsonl(path, &text)?.iter().map(Example::prompt).filter(|p| !p.trim().is_empty()).collect()
    } else {
        prompt_lines(&text)
    };
    if prompts.is_empty() {
        return Err(bad(path, "no prompts found"));
    }
    Ok(prompts)
}

fn read_plain(text: &str) -> Vec<Example> {
    text.split("\n\n").map(str::trim).filter(|d| !d.is_empty()).map(|d| Example::Text(d.to_string())).collect()
}

fn read_jsonl(path: &Path, text: &str) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |reason: String| bad(path, format!("line {}: {reason}", i + 1));
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| at(format!("not JSON: {e}")))?;
        if let Some(t) = v.get("text").and_then(|t| t.as_str()) {
            if t.trim().is_empty() {
                return Err(at("`text` is empty".into()));
            }
            out.push(Example::Text(t.to_string()));
        } else if let Some(m) = v.get("messages").and_then(|m| m.as_array()) {
            let mut turns = Vec::new();
            for msg in m {
                let role = msg.get("role").and_then(|r| r.as_str()).ok_or_else(|| at("a message has no string `role`".into()))?;
                let content = msg.get("content").and_then(|c| c.as_str()).ok_or_else(|| at("a message has no string `content`".into()))?;
                turns.push((role.to_string(), content.to_string()));
            }
            if turns.is_empty() {
                return Err(at("`messages` is empty".into()));
            }
            out.push(Example::Chat(turns));
        } else {
            return Err(at("expected an object with `text` (a string) or `messages` (a list)".into()));
        }
    }
    Ok(out)
}

/// Non-empty lines of a prompt list.
pub fn prompt_lines(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
}

/// Token ids of an example: chat turns through the model's template, text as it is.
pub fn tokenize(package: &DevicePackage, example: &Example) -> Result<Vec<u32>> {
    let text = match example {
        Example::Text(t) => t.clone(),
        Example::Chat(turns) => {
            let template = package
                .manifest
                .tokenizer
                .as_ref()
                .and_then(|t| t.chat_template.as_deref())
                .ok_or_else(|| TrainError::BadInput("chat `messages` need a chat template, and this model has none".into()))?;
            let info = package.manifest.tokenizer.as_ref();
            let bos = info.and_then(|t| t.bos_token.as_ref()).map(|t| t.content.as_str());
            let eos = info.and_then(|t| t.eos_tokens.first()).map(|t| t.content.as_str());
            render_conversation(template, turns, bos, eos)?
        }
    };
    let enc = package.tokenizer.encode(text.as_str(), false).map_err(|e| TrainError::BadInput(format!("tokenizer: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

/// A user prompt ready for generation (self-distillation, evaluation): one chat turn when the model
/// has a template, else the text as it is.
pub fn chat_prompt(package: &DevicePackage, user: &str) -> Result<Vec<u32>> {
    let chat = package.manifest.tokenizer.as_ref().is_some_and(|t| t.chat_template.is_some());
    Ok(hat_runtime::chat::prompt_ids(package, user, chat)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No prompt the project trains on is a held-out one, written or invented, and the two held-out
    /// sets are what their files say: 32 and 64 distinct prompts.
    #[test]
    fn held_out_prompts_are_in_no_training_set() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts");
        let lines = prompt_lines(HELDOUT_PROMPTS).len() + prompt_lines(HELDOUT_INVENTED_PROMPTS).len();
        let distinct = held_out_prompts();
        assert_eq!((lines, distinct.len()), (32 + 64, 32 + 64), "held-out prompts, each once");
        let mut files = 0;
        for entry in std::fs::read_dir(&dir).expect("prompts directory") {
            let path = entry.expect("entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if name.starts_with("heldout") {
                continue;
            }
            files += 1;
            let text = std::fs::read_to_string(&path).expect("prompt file");
            for p in prompt_lines(&text) {
                assert!(!distinct.contains(&p), "{name} holds the held-out prompt {p:?}");
            }
        }
        assert!(files >= 6, "the training prompt files were found ({files})");
    }

    /// The subject test catches a held-out prompt in other words, and only then.
    #[test]
    fn prompts_on_a_held_out_subject_are_caught() {
        assert!(near_held_out("Write a poem about the moon at night."));
        assert!(near_held_out("Explain to a child why the seasons change through the year."));
        assert!(!near_held_out("Write a poem about a cat."));
        assert!(!near_held_out("Explain why the sky is blue."));
        // Every held-out prompt of two subject words or more is on its own subject; one word ("Can you
        // help me with a password?") is too little to tell a subject by.
        let held_out = held_out_prompts();
        let caught = held_out.iter().filter(|p| near_held_out(p)).count();
        let single = held_out.iter().filter(|p| subject_words(p).len() < 2).count();
        assert_eq!((caught, single), (held_out.len() - 2, 2));
    }

    fn write(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("data");
        std::fs::write(&p, text).expect("write");
        (dir, p)
    }

    #[test]
    fn reads_plain_text_jsonl_text_and_chat() {
        let (_d, p) = write("first doc\nline two\n\n\nsecond doc\n");
        assert_eq!(read_data(&p).expect("plain"), vec![Example::Text("first doc\nline two".into()), Example::Text("second doc".into())]);
        let (_d, p) = write("{\"text\": \"hello\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n");
        let ex = read_data(&p).expect("jsonl");
        assert_eq!(ex[0], Example::Text("hello".into()));
        assert_eq!(ex[1].prompt(), "hi");
    }

    #[test]
    fn prompts_are_lines_of_plain_text_and_user_turns_of_jsonl() {
        let (_d, p) = write("first prompt\n\n  second prompt  \nthird\n");
        assert_eq!(read_prompts(&p).expect("plain"), vec!["first prompt", "second prompt", "third"]);
        let (_d, p) = write("{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", \"content\": \"hi\"}]}\n{\"text\": \"a\\nb\"}\n");
        assert_eq!(read_prompts(&p).expect("jsonl"), vec!["hi", "a"]);
        let (_d, p) = write("\n \n");
        assert!(read_prompts(&p).expect_err("empty").to_string().contains("no prompts"));
    }

    #[test]
    fn empty_and_malformed_files_name_the_problem() {
        let (_d, p) = write("  \n\n");
        assert!(read_data(&p).expect_err("empty").to_string().contains("empty"));
        let (_d, p) = write("{\"text\": \"ok\"}\n{not json\n");
        assert!(read_data(&p).expect_err("bad").to_string().contains("line 2"));
        let (_d, p) = write("{\"prompt\": \"x\"}\n");
        assert!(read_data(&p).expect_err("no text").to_string().contains("`text`"));
        assert!(read_data(Path::new("/no/such/file")).is_err());
    }
}
