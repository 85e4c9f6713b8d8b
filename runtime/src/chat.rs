//! Renders the model's own chat template (Jinja, from the tokenizer config or GGUF metadata).

use minijinja::{context, Environment};

use crate::error::{Result, RuntimeError};

/// One user turn, with the template's own default system prompt if it has one.
pub fn render_user_prompt(template: &str, user: &str, bos: Option<&str>, eos: Option<&str>) -> Result<String> {
    let mut env = Environment::new();
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template).map_err(|e| RuntimeError::ChatTemplate(e.to_string()))?;
    let tmpl = env.get_template("chat").map_err(|e| RuntimeError::ChatTemplate(e.to_string()))?;
    tmpl.render(context! {
        messages => vec![context! { role => "user", content => user }],
        add_generation_prompt => true,
        bos_token => bos.unwrap_or(""),
        eos_token => eos.unwrap_or(""),
    })
    .map_err(|e| RuntimeError::ChatTemplate(e.to_string()))
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
