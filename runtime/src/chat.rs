//! Renders the model's own chat template (Jinja, from the tokenizer config or GGUF metadata).

use minijinja::{context, Environment};

use crate::error::{Result, RuntimeError};

/// One user turn, with the template's own default system prompt if it has one.
pub fn render_user_prompt(template: &str, user: &str, bos: Option<&str>, eos: Option<&str>) -> Result<String> {
    render(template, &[("user".to_string(), user.to_string())], true, bos, eos)
}

/// A whole conversation of (role, content) turns, as training text (no generation prompt).
pub fn render_conversation(template: &str, turns: &[(String, String)], bos: Option<&str>, eos: Option<&str>) -> Result<String> {
    render(template, turns, false, bos, eos)
}

fn render(template: &str, turns: &[(String, String)], add_generation_prompt: bool, bos: Option<&str>, eos: Option<&str>) -> Result<String> {
    let mut env = Environment::new();
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template).map_err(|e| RuntimeError::ChatTemplate(e.to_string()))?;
    let tmpl = env.get_template("chat").map_err(|e| RuntimeError::ChatTemplate(e.to_string()))?;
    let messages: Vec<_> = turns.iter().map(|(role, content)| context! { role => role, content => content }).collect();
    tmpl.render(context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos.unwrap_or(""),
        eos_token => eos.unwrap_or(""),
    })
    .map_err(|e| RuntimeError::ChatTemplate(e.to_string()))
}

/// Token ids of a prompt: the text as is (with the tokenizer's own special tokens), or wrapped in the
/// model's chat template as one user turn.
pub fn prompt_ids(package: &crate::package::DevicePackage, text: &str, chat: bool) -> Result<Vec<u32>> {
    if chat {
        chat_prompt_ids(package, &[("user".to_string(), text.to_string())])
    } else {
        encode(package, text, true)
    }
}

/// Token ids of a conversation of (role, content) turns in the model's chat template, ending with the
/// prompt for the assistant's reply.
pub fn chat_prompt_ids(package: &crate::package::DevicePackage, turns: &[(String, String)]) -> Result<Vec<u32>> {
    let info = package.manifest.tokenizer.as_ref();
    let template = info.and_then(|t| t.chat_template.as_deref()).ok_or_else(|| {
        RuntimeError::ChatTemplate("this model has no chat template; send plain text (drop --chat, or use /v1/completions)".into())
    })?;
    let bos = info.and_then(|t| t.bos_token.as_ref()).map(|t| t.content.as_str());
    let eos = info.and_then(|t| t.eos_tokens.first()).map(|t| t.content.as_str());
    encode(package, &render(template, turns, true, bos, eos)?, false)
}

fn encode(package: &crate::package::DevicePackage, text: &str, add_special: bool) -> Result<Vec<u32>> {
    let encoding = package.tokenizer.encode(text, add_special).map_err(|e| RuntimeError::Tokenizer(e.to_string()))?;
    Ok(encoding.get_ids().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_template_renders_a_user_turn() -> Result<()> {
        let text = render_user_prompt(CHATML, "Hi?", None, None)?;
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
        );
        Ok(())
    }
}
