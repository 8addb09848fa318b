//! `aoai-gateway`: a gateway in front of a multi-region Azure OpenAI pool.
#![forbid(unsafe_code)]

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use gateway::{config, keys, server};

/// mimalloc: fewer cycles per request than glibc malloc on this allocation-heavy path, and
/// less fragmentation under TLS + h2 load (see ../shared/notes/pingora-0.9.md).
/// (The `system-alloc` feature leaves the C allocator in place, for heap profilers.)
#[cfg(not(feature = "system-alloc"))]
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
    /// Revoke a key on every gateway sharing the configuration's Redis (state.store: redis).
    Revoke {
        /// The key's id: the first 8 hex of its SHA-256, as the audit log's key_id.
        #[arg(long = "key-id")]
        key_id: String,
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
    },
    /// Lift a revocation.
    Unrevoke {
        #[arg(long = "key-id")]
        key_id: String,
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
    },
    /// List the revoked key ids: id, revoked at, owning client(s).
    Revoked {
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
    },
}

/// `keys revoke|unrevoke|revoked`: loads FILE (for its state store and keys) and runs it.
fn revocation(path: &std::path::Path, what: keys::Revocation, key_id: Option<&str>) -> ExitCode {
    let cfg = match config::load_file(path) {
        Ok(cfg) => cfg,
        Err(errors) => {
            for e in &errors {
                eprintln!("{}: {e}", path.display());
            }
            return ExitCode::FAILURE;
        }
    };
    match keys::revocation(&cfg, what, key_id) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
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
            command: KeysCommand::Revoke { key_id, config },
        } => revocation(&config, keys::Revocation::Revoke, Some(&key_id)),
        Command::Keys {
            command: KeysCommand::Unrevoke { key_id, config },
        } => revocation(&config, keys::Revocation::Unrevoke, Some(&key_id)),
        Command::Keys {
            command: KeysCommand::Revoked { config },
        } => revocation(&config, keys::Revocation::List, None),
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
