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
    // Python's string and dict methods (`.startswith`, `.split`, `.items()`, ...), which Qwen's and
    // other models' templates call.
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
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

    /// Gemma 3's template as its tokenizer_config.json ships it: whitespace control, `is string`,
    /// `| trim`, slicing, the system turn folded into the first user turn, and `raise_exception`.
    const GEMMA3: &str = include_str!("../tests/templates/gemma3.jinja");
    /// Qwen3's template (its shipped structure, written out offline): `namespace`, a reversed
    /// slice, Python string methods (`startswith`, `split`, `lstrip`, ...), `is defined`.
    const QWEN3: &str = include_str!("../tests/templates/qwen3.jinja");

    fn turns(t: &[(&str, &str)]) -> Vec<(String, String)> {
        t.iter().map(|(r, c)| (r.to_string(), c.to_string())).collect()
    }

    #[test]
    fn gemma3_template_renders_turns_and_refuses_what_it_refuses() -> Result<()> {
        let bos = Some("<bos>");
        assert_eq!(render_user_prompt(GEMMA3, " Hi? ", bos, None)?, "<bos><start_of_turn>user\nHi?<end_of_turn>\n<start_of_turn>model\n");
        let chat = turns(&[("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello."), ("user", "Bye?")]);
        assert_eq!(
            render(GEMMA3, &chat, true, bos, None)?,
            "<bos><start_of_turn>user\nBe brief.\n\nHi?<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\nBye?<end_of_turn>\n<start_of_turn>model\n"
        );
        let err = render(GEMMA3, &turns(&[("user", "a"), ("user", "b")]), true, bos, None).expect_err("roles must alternate");
        assert!(err.to_string().contains("Conversation roles must alternate"), "{err}");
        Ok(())
    }

    #[test]
    fn qwen3_template_renders_with_python_string_methods() -> Result<()> {
        assert_eq!(render_user_prompt(QWEN3, "Hi?", None, None)?, "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n");
        let chat = turns(&[
            ("system", "Be brief."),
            ("user", "Hi?"),
            ("assistant", "<think>\nThey greet me.\n</think>\n\nHello."),
            ("user", "Bye?"),
        ]);
        // The earlier answer loses its reasoning (it precedes the last user query).
        assert_eq!(
            render(QWEN3, &chat, true, None, None)?,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n\
             <|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\n"
        );
        Ok(())
    }
}
