//! The `tern` command: configuration from a file and flags, logging, signals.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tern::{Broker, Config};

/// Counts heap bytes in use, for `memory_limit`.
#[global_allocator]
static ALLOC: tern::alloc::Counting = tern::alloc::Counting;

const CONFIG_HELP: &str = "\
Configuration file keys (TOML; README.md has each with its default and what happens past it).
A mosquitto.conf is read too (-c /etc/mosquitto/mosquitto.conf; --print-config shows its TOML):
  bind, port, plain_listener      the plain MQTT listener (default 127.0.0.1:1883; false: none)
  workers, pin_workers            event loops (0 = one per core), pinned to cores
  arrival_order                   order SUBSCRIBEs and PUBLISHes across workers by arrival
  worker_scheduling               auto, batch or normal: SCHED_BATCH for workers (auto: as many as CPUs)
  placement_seed                  fixed key for placing sessions on workers (benchmarks)
  log_level, log_file, pid_file   error, warn, info, debug, trace, off; log to a file; pid file
  max_connections, connect_timeout, max_packet_size, message_size_limit, max_inflight_messages,
  max_queued_messages, max_queued_bytes, max_output_bytes, max_sessions,
  max_subscriptions_per_client, max_subscription_bytes_per_client, max_subscription_bytes,
  max_retained_messages, max_retained_bytes, max_partial_bytes, partial_packet_timeout,
  memory_limit, persistent_client_expiration, slow_subscriber_timeout,
  slow_subscriber_policy, sys_interval, allow_zero_length_clientid
  password_file, allow_anonymous  mosquitto's password file (see `tern passwd`), anonymous clients
  acl_file                        mosquitto's ACL file (user, topic, pattern lines)
  acl_denial_reason               not_authorized (0x87) or unspecified (0x80) for a 5.0 refusal
  persistence, persistence_location, persistence_interval   off, periodic or durable; the store directory

More listeners, each a [[listener]] table (mosquitto's names):
  port                            TCP port (0: any free one)
  bind                            address (default: the top-level bind)
  protocol                        \"mqtt\" or \"websockets\"
  certfile, keyfile               server certificate chain and key (PEM): TLS
  cafile                          CA (PEM) for client certificates
  crlfile                         revoked client certificates (PEM CRLs)
  require_certificate             a client certificate signed by cafile is required
  use_identity_as_username        the client certificate's CN is the username

Signals: SIGINT/SIGTERM stop cleanly (wills published); SIGHUP re-reads TLS certificates.";

/// tern: a fast MQTT 3.1/3.1.1/5.0 broker.
#[derive(Parser, Debug)]
#[command(version, about, after_long_help = CONFIG_HELP)]
struct Cli {
    /// Configuration file: TOML, or mosquitto's mosquitto.conf (a name ending in .conf). Without
    /// one, tern listens on 127.0.0.1:1883.
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// Print the configuration in effect (the file and flags) as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Port to listen on (overrides the file).
    #[arg(short = 'p', long)]
    port: Option<u16>,
    /// Address to bind (overrides the file).
    #[arg(long)]
    bind: Option<std::net::IpAddr>,
    /// Worker threads, one event loop each; 0 = one per core (overrides the file).
    #[arg(long)]
    workers: Option<usize>,
    /// Verbose logging (debug level).
    #[arg(short = 'v', long)]
    verbose: bool,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Manage a password file, as mosquitto_passwd does: writes $7$ (PBKDF2-SHA512) entries
    /// that mosquitto 2.0 reads too, or with --scram tern's SCRAM-SHA-256 entries.
    Passwd {
        /// Create the file (overwriting one that exists).
        #[arg(short = 'c')]
        create: bool,
        /// Take the password from the command line instead of a prompt.
        #[arg(short = 'b')]
        batch: bool,
        /// Delete the user.
        #[arg(short = 'D')]
        delete: bool,
        /// PBKDF2 iterations (default 210,000; 4,096 with --scram, which clients pay for).
        #[arg(short = 'I')]
        iterations: Option<u32>,
        /// Write a SCRAM-SHA-256 entry (salt, iterations, StoredKey, ServerKey), for MQTT 5.0
        /// enhanced authentication; plain passwords are checked against it too.
        #[arg(long)]
        scram: bool,
        file: PathBuf,
        user: String,
        /// With -b.
        password: Option<String>,
    },
}

/// `tern passwd`: exit status 0 on success, 1 with a message otherwise.
fn passwd(cmd: Cmd) -> ExitCode {
    let Cmd::Passwd { create, batch, delete, iterations, scram, file, user, password } = cmd;
    let fail = |why: String| {
        eprintln!("tern passwd: {why}");
        ExitCode::FAILURE
    };
    if user.contains(':') || user.is_empty() {
        return fail("a user name must not be empty or contain ':'".into());
    }
    let text = if create {
        String::new()
    } else {
        match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => return fail(format!("{}: {e} (use -c to create it)", file.display())),
        }
    };
    let entry = if delete {
        if !text.lines().any(|l| l.split_once(':').is_some_and(|(u, _)| u == user)) {
            return fail(format!("user {user} not found"));
        }
        None
    } else {
        let password = match (batch, password) {
            (true, Some(p)) => p,
            (true, None) => return fail("-b needs the password on the command line".into()),
            (false, Some(_)) => return fail("a password on the command line needs -b".into()),
            (false, None) => {
                let p = match rpassword::prompt_password("Password: ") {
                    Ok(p) => p,
                    Err(e) => return fail(format!("cannot read the password: {e}")),
                };
                match rpassword::prompt_password("Reenter password: ") {
                    Ok(again) if again == p => p,
                    Ok(_) => return fail("passwords do not match".into()),
                    Err(e) => return fail(format!("cannot read the password: {e}")),
                }
            }
        };
        let iterations = iterations.unwrap_or(if scram {
            tern::auth::scram::DEFAULT_ITERATIONS
        } else {
            tern::auth::passwd::DEFAULT_ITERATIONS
        });
        if iterations == 0 {
            return fail("-I must be at least 1".into());
        }
        Some(if scram {
            tern::auth::Hash::Scram(tern::auth::scram::Entry::new(password.as_bytes(), iterations))
        } else {
            tern::auth::Hash::new_pbkdf2(password.as_bytes(), iterations)
        })
    };
    let out = tern::auth::passwd::set_user(&text, &user, entry.as_ref());
    match std::fs::write(&file, out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("{}: {e}", file.display())),
    }
}

/// Removes the pid file when `main` returns.
struct PidFile(Option<PathBuf>);

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if let Some(cmd) = cli.command.take() {
        return passwd(cmd);
    }
    let mut config = match &cli.config {
        Some(path) => match Config::from_file(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("tern: {e}");
                return ExitCode::from(2);
            }
        },
        None => Config::default(),
    };
    if let Some(p) = cli.port {
        config.port = p;
    }
    if let Some(b) = cli.bind {
        config.bind = b;
    }
    if let Some(w) = cli.workers {
        config.workers = w;
    }
    if cli.verbose {
        config.log_level = "debug".into();
    }
    if let Err(e) = config.validate() {
        eprintln!("tern: {e}");
        return ExitCode::from(2);
    }
    if cli.print_config {
        return match toml::to_string(&config) {
            Ok(text) => {
                let from = cli.config.as_ref().map_or("defaults".to_string(), |p| p.display().to_string());
                print!("# tern configuration from {from}\n{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tern: cannot print the configuration: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let mut logger = env_logger::Builder::new();
    logger.parse_filters(&config.log_level).parse_default_env().format_timestamp_millis();
    if let Some(path) = &config.log_file {
        match std::fs::OpenOptions::new().create(true).append(true).open(path) {
            Ok(f) => {
                logger.target(env_logger::Target::Pipe(Box::new(f)));
            }
            Err(e) => {
                eprintln!("tern: log file {}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    logger.init();
    let pid_file = config.pid_file.clone();
    if let Some(path) = &pid_file {
        if let Err(e) = std::fs::write(path, format!("{}\n", std::process::id())) {
            log::error!("pid file {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    let _remove_pid_file = PidFile(pid_file);
    // Past a file-size limit (ulimit -f) a write fails with EFBIG instead of killing the broker:
    // the store then refuses what it cannot keep (see Persistence).
    let ignored = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _ = signal_hook::flag::register(signal_hook::consts::SIGXFSZ, ignored);
    let broker = match Broker::start(config) {
        Ok(b) => b,
        Err(e) => {
            log::error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stopper = broker.stopper();
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if sig == SIGHUP {
                match stopper.reload_auth() {
                    Ok(()) => log::info!("SIGHUP: password and ACL files reloaded"),
                    Err(e) => log::error!("SIGHUP: kept the old version of what did not load: {e}"),
                }
                // Certificates renewed (certbot and friends): new connections get the new ones.
                let errors = stopper.reload_tls();
                if errors.is_empty() {
                    log::info!("SIGHUP: TLS certificates and keys reloaded");
                }
                for e in errors {
                    log::error!("SIGHUP: keeping the old TLS configuration: {e}");
                }
                continue;
            }
            log::info!("signal {sig}: shutting down");
            stopper.stop();
            break;
        }
    });
    if !broker.join() {
        log::error!("stopped after a worker failure");
        return ExitCode::FAILURE;
    }
    log::info!("bye");
    ExitCode::SUCCESS
}
