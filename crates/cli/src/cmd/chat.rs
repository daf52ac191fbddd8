//! `fp4moe chat`: an interactive conversation on stdin/stdout. The whole history is rendered with
//! the chat template each turn, so the model sees exactly the format it was trained on.

use std::io::{BufRead, Write};
use std::ops::ControlFlow;

use anyhow::Context;
use fp4moe_engine::{Error as EngineError, Generator, Message, Request, SamplingParams};

use super::run::{
    DEFAULT_SYNTHETIC_LAYERS, ModelArgs, PromptFormat, SamplingArgs, encode_prompt, load, stats_line,
};

/// `fp4moe chat`
#[derive(clap::Args)]
#[command(after_help = "Type a message and press Enter. Commands: /reset (forget the conversation), \
    /quit (or end of input).\n\nExamples:\n  fp4moe chat                      # synthetic model, no download\n  \
    fp4moe chat --model ./GLM-4.7-Flash --quant mxfp4")]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Most tokens per reply.
    #[arg(long, short = 'n', default_value_t = 512)]
    pub max_tokens: usize,

    #[command(flatten)]
    pub format: PromptFormat,

    #[command(flatten)]
    pub sampling: SamplingArgs,

    /// Print statistics after every reply.
    #[arg(long)]
    pub stats: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    args.sampling.resolve(SamplingParams::default())?;
    if args.max_tokens == 0 {
        anyhow::bail!("--max-tokens must be at least 1");
    }
    if args.format.raw {
        anyhow::bail!("chat needs the chat template; --raw is for `fp4moe run`");
    }
    let loaded = load(&args.model, Some(DEFAULT_SYNTHETIC_LAYERS))?;
    eprintln!("model: {} [loaded in {:.1} s]", loaded.description, loaded.load_s);
    if loaded.tokenizer.chat_template().is_none() {
        anyhow::bail!(
            "the model has no chat template (tokenizer_config.json chat_template or chat_template.jinja)"
        );
    }
    let sampling = args.sampling.resolve(loaded.sampling_defaults.clone())?;
    let generator = Generator::new(loaded.model.as_ref(), loaded.tokenizer.clone())?
        .with_context_limit(args.model.ctx)
        .with_prefill_chunk(args.model.prefill_chunk);
    eprintln!("commands: /reset clears the conversation, /quit leaves");

    let mut history: Vec<Message> = Vec::new();
    if let Some(s) = &args.format.system {
        history.push(Message::new("system", s.clone()));
    }
    let system_len = history.len();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut stdout = std::io::stdout();
    loop {
        eprint!("> ");
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        let input = line.trim();
        match input {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                history.truncate(system_len);
                eprintln!("(conversation cleared)");
                continue;
            }
            _ if input.starts_with('/') => {
                eprintln!("unknown command {input}; commands: /reset, /quit");
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", input));
        let prompt = encode_prompt(&loaded.tokenizer, &args.format, &history, input)?;
        let request = Request::new(sampling.clone(), args.max_tokens);
        let result = generator.generate(&prompt, &request, |step| {
            if stdout.write_all(step.text.as_bytes()).and_then(|()| stdout.flush()).is_err() {
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        });
        match result {
            Ok(g) => {
                writeln!(stdout)?;
                if args.stats {
                    eprintln!("{}", stats_line(&g));
                }
                history.push(Message::new("assistant", g.text));
            }
            // A conversation that outgrew the context is the user's to resolve, not fatal.
            Err(e @ (EngineError::PromptTooLong { .. } | EngineError::ContextOverflow { .. })) => {
                history.pop();
                eprintln!("error: {e}\n(/reset starts a new conversation)");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
