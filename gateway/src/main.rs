//! `aoai-gateway`: a gateway in front of a multi-region Azure OpenAI pool.
#![forbid(unsafe_code)]

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use gateway::{config, keys, server};

/// mimalloc: fewer cycles per request than glibc malloc on this allocation-heavy path, and
/// less fragmentation under TLS + h2 load (see ../shared/notes/pingora-0.9.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "aoai-gateway",
    version,
    about = "A gateway in front of a multi-region Azure OpenAI pool"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with the configuration FILE.
    Run {
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
        /// Take over the listening sockets of a running instance (graceful upgrade).
        #[arg(long)]
        upgrade: bool,
        /// Run in the background.
        #[arg(long)]
        daemon: bool,
    },
    /// Validate FILE: print every error with its YAML path and line; exit 1 on any error.
    Check {
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
    },
    /// Issue and hash API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a new random key and the YAML entry with its SHA-256.
    New {
        #[arg(long)]
        client: Option<String>,
    },
    /// Read one key on stdin and print its SHA-256 (hex).
    Hash,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .target(env_logger::Target::Stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            upgrade,
            daemon,
        } => match server::run(server::RunOptions {
            config,
            upgrade,
            daemon,
        }) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Check { config: path } => match config::load_file(&path) {
            Ok(cfg) => {
                println!(
                    "{}: valid ({} clients, {} deployments, {} backends)",
                    path.display(),
                    cfg.clients.len(),
                    cfg.deployments.len(),
                    cfg.backends.len()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                for e in &errors {
                    println!("{}: {e}", path.display());
                }
                println!("{} error(s)", errors.len());
                ExitCode::FAILURE
            }
        },
        Command::Keys {
            command: KeysCommand::New { client },
        } => {
            print!("{}", keys::new_key_text(client.as_deref()));
            ExitCode::SUCCESS
        }
        Command::Keys {
            command: KeysCommand::Hash,
        } => {
            let mut input = String::new();
            if std::io::stdin().read_to_string(&mut input).is_err() {
                eprintln!("cannot read the key from stdin");
                return ExitCode::FAILURE;
            }
            let key = input.trim();
            if key.is_empty() {
                eprintln!("no key on stdin");
                return ExitCode::FAILURE;
            }
            println!("{}", filters::apikey::hash_key(key));
            ExitCode::SUCCESS
        }
    }
}
