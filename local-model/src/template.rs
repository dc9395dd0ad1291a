//! Chat templates: turning a list of messages into the model's prompt text.

use std::sync::Arc;

use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{GenerateError, LoadError};

/// One chat message, as in OpenAI's API (text content only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    /// Creates a message with the given role and text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// How messages become a prompt.
#[derive(Debug, Clone)]
pub enum ChatTemplate {
    /// The model's own Jinja template (from GGUF metadata or
    /// tokenizer_config.json), compiled once: see [`ChatTemplate::jinja`].
    Jinja(JinjaTemplate),
    /// Phi-1.5's `Instruct: …\nOutput:` format; the model is a base model
    /// with no template of its own.
    PhiInstruct,
    /// Messages' contents joined by blank lines, for base models.
    Plain,
}

/// The template names a user can pick on the command line.
pub const TEMPLATE_NAMES: &[&str] = &["auto", "model", "phi", "plain"];

/// A model's Jinja chat template, compiled, with the special tokens it may
/// write. Compiled once at load: compiling it on every request (an
/// environment, the lexer, the parser and the code generator) was most of
/// the gateway's own CPU time per request that it counted prompt tokens for.
#[derive(Debug, Clone)]
pub struct JinjaTemplate {
    /// Holds the template under [`TEMPLATE_NAME`]; shared by every clone.
    environment: Arc<Environment<'static>>,
    bos_token: String,
    eos_token: String,
}

/// The name the compiled template is kept under.
const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles a model's Jinja template, so a broken one fails at load.
    pub fn jinja(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self, LoadError> {
        let mut environment = environment();
        environment
            .add_template_owned(TEMPLATE_NAME, source.into())
            .map_err(|e| LoadError::Template(e.to_string()))?;
        Ok(ChatTemplate::Jinja(JinjaTemplate {
            environment: Arc::new(environment),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        }))
    }

    /// Whether the rendered text starts with the model's BOS token already
    /// (a model's own template writes `{{ bos_token }}`).
    pub fn writes_bos(&self) -> bool {
        matches!(self, ChatTemplate::Jinja(_))
    }

    /// Short name for logs and `--json` output.
    pub fn name(&self) -> &'static str {
        match self {
            ChatTemplate::Jinja(_) => "model",
            ChatTemplate::PhiInstruct => "phi",
            ChatTemplate::Plain => "plain",
        }
    }

    /// Renders the messages into prompt text ready for generation.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, GenerateError> {
        match self {
            ChatTemplate::Jinja(JinjaTemplate {
                environment,
                bos_token,
                eos_token,
            }) => {
                let template = environment
                    .get_template(TEMPLATE_NAME)
                    .map_err(|e| GenerateError::Template(e.to_string()))?;
                template
                    .render(context! {
                        messages => messages,
                        add_generation_prompt => true,
                        bos_token => bos_token,
                        eos_token => eos_token,
                    })
                    .map_err(|e| GenerateError::Template(e.to_string()))
            }
            ChatTemplate::PhiInstruct => {
                // Phi-1.5 was trained on "Instruct: …\nOutput:" exercises; a
                // system message is folded into the instruction.
                let mut instruction = String::new();
                for m in messages {
                    if !instruction.is_empty() {
                        instruction.push('\n');
                    }
                    instruction.push_str(m.content.trim());
                }
                Ok(format!("Instruct: {instruction}\nOutput:"))
            }
            ChatTemplate::Plain => Ok(messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n\n")),
        }
    }
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    // Hugging Face templates are written for Python's Jinja: they call string
    // methods like `.strip()` and the `raise_exception` helper.
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn phi_template_wraps_instruction() {
        let out = ChatTemplate::PhiInstruct
            .render(&[ChatMessage::new("user", " What is 2+2? ")])
            .unwrap();
        assert_eq!(out, "Instruct: What is 2+2?\nOutput:");
    }

    #[test]
    fn jinja_template_renders_with_python_methods_and_generation_prompt() {
        let t = ChatTemplate::jinja(
            "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
            "<s>",
            "</s>",
        )
        .unwrap();
        let out = t
            .render(&[
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", " hi "),
            ])
            .unwrap();
        assert_eq!(out, "<s><system>Be brief.\n<user>hi\n<assistant>");
    }

    /// A template in the style of Gemma's: BOS, a system message folded
    /// into the first user turn, `assistant` renamed `model`, contents
    /// trimmed, and alternation enforced with `raise_exception`.
    fn gemma_style() -> ChatTemplate {
        let source = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
  {%- set prefix = messages[0]['content'] | trim ~ '

' -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set prefix = '' -%}
  {%- set turns = messages -%}
{%- endif -%}
{%- for m in turns -%}
  {%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{ raise_exception('turns must alternate user/assistant') }}
  {%- endif -%}
  {%- if m['content'] is not string -%}
    {{ raise_exception('content must be text') }}
  {%- endif -%}
  {{ '<start_of_turn>' ~ ('model' if m['role'] == 'assistant' else m['role']) ~ '
' }}
  {{- (prefix if loop.first else '') ~ m['content'] | trim }}<end_of_turn>
{% endfor -%}
{%- if add_generation_prompt %}<start_of_turn>model
{% endif -%}"#;
        ChatTemplate::jinja(source, "<bos>", "<eos>").unwrap()
    }

    #[test]
    fn gemma_style_template_renders_turns() {
        let out = gemma_style()
            .render(&[
                ChatMessage::new("system", "Be brief. "),
                ChatMessage::new("user", " Capital of France? "),
                ChatMessage::new("assistant", "Paris."),
                ChatMessage::new("user", "And Japan?"),
            ])
            .unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nBe brief.\n\nCapital of France?<end_of_turn>\n\
             <start_of_turn>model\nParis.<end_of_turn>\n\
             <start_of_turn>user\nAnd Japan?<end_of_turn>\n\
             <start_of_turn>model\n"
        );
    }

    #[test]
    fn gemma_style_template_rejects_turns_out_of_order() {
        let err = gemma_style()
            .render(&[
                ChatMessage::new("assistant", "Hi"),
                ChatMessage::new("user", "Hello"),
            ])
            .unwrap_err();
        assert!(err.to_string().contains("must alternate"), "{err}");
    }

    #[test]
    fn raise_exception_in_template_is_an_error_not_a_panic() {
        let t = ChatTemplate::jinja(
            "{% if messages[0].role == 'bad' %}{{ raise_exception('roles must alternate') }}{% endif %}ok",
            "",
            "",
        )
        .unwrap();
        let err = t.render(&[ChatMessage::new("bad", "x")]).unwrap_err();
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }

    #[test]
    fn broken_template_fails_validation() {
        let err = ChatTemplate::jinja("{% for %}", "", "").unwrap_err();
        assert!(matches!(err, LoadError::Template(_)), "{err}");
    }
}
