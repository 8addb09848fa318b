//! `aoai-gateway`: a gateway in front of a multi-region Azure OpenAI pool.
// The binary's one unsafe call sets mimalloc's options (`allocator::tune`); everything else,
// and the whole `gateway` library, forbids unsafe code.
#![deny(unsafe_code)]

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

/// mimalloc's options that decide whether memory goes back to the system after a load.
///
/// With mimalloc's defaults a freed page is purged only at a later allocation made more than
/// a second after it was freed, so a gateway that falls idle after a burst of streams keeps the
/// burst's memory (issue 18: +40 MiB 30 s after 1,000 SSE streams). A 100 ms purge delay
/// gives it back while the last requests of the load are still freeing, at no measured cost
/// on the request path; arenas committed on demand keep the idle figure low. An operator's
/// `MIMALLOC_PURGE_DELAY` / `MIMALLOC_ARENA_EAGER_COMMIT` environment variable wins.
mod allocator {
    use std::os::raw::{c_int, c_long};

    /// `mi_option_purge_delay` and `mi_option_arena_eager_commit` in mimalloc 3's `mi_option_e`
    /// (the sys crate names only some of the options; the test below checks the numbering
    /// against the defaults of the linked mimalloc).
    const PURGE_DELAY: c_int = 15;
    const ARENA_EAGER_COMMIT: c_int = 4;

    /// (option, environment variable that overrides it, value set otherwise)
    const SETTINGS: [(c_int, &str, c_long); 2] = [
        (PURGE_DELAY, "MIMALLOC_PURGE_DELAY", 100),
        (ARENA_EAGER_COMMIT, "MIMALLOC_ARENA_EAGER_COMMIT", 0),
    ];

    pub fn tune() {
        for (option, variable, value) in SETTINGS {
            if std::env::var_os(variable).is_none() {
                set(option, value);
            }
        }
        // Transparent huge pages (`always` on many distributions) fault 2 MiB at a time into
        // the allocator's arenas, and a purge of a few pages then gives nothing back: with
        // them off the idle RSS was 34 instead of 47 MiB and the RSS 30 s after 1,000 SSE
        // streams +2 instead of +7..+33 MiB (load-tests/results.md, session 8). The same
        // choice as mimalloc's own `MIMALLOC_ALLOW_THP=0`, which keeps THP when set to 1.
        #[cfg(target_os = "linux")]
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_none_or(|v| v == "0") {
            if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
                log::debug!("transparent huge pages left on: prctl: {e}");
            }
        }
    }

    #[allow(unsafe_code)]
    fn set(option: c_int, value: c_long) {
        // SAFETY: `mi_option_set` stores one integer in mimalloc's static option table (the
        // store mimalloc makes itself when it reads the environment); it takes no pointer, any
        // value is valid for these two options, and the allocator reads the option at its next
        // purge or arena reservation.
        unsafe { libmimalloc_sys::mi_option_set(option, value) }
    }

    #[cfg(test)]
    #[allow(unsafe_code)]
    fn get(option: c_int) -> c_long {
        // SAFETY: a read of the same table, no pointer.
        unsafe { libmimalloc_sys::mi_option_get(option) }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_numbers_name_the_options_they_mean() {
            // mimalloc 3's defaults: purge delay 1,000 ms; arena eager commit 2 ("on where the
            // OS overcommits"). Another numbering would read another option's default.
            if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
                assert_eq!(get(PURGE_DELAY), 1000);
            }
            if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_none() {
                assert_eq!(get(ARENA_EAGER_COMMIT), 2);
            }
            tune();
            for (option, variable, value) in SETTINGS {
                if std::env::var_os(variable).is_none() {
                    assert_eq!(get(option), value, "{variable}");
                }
            }
            #[cfg(target_os = "linux")]
            if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
                assert_eq!(nix::sys::prctl::get_thp_disable(), Ok(true));
            }
        }
    }
}

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
    allocator::tune();
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
