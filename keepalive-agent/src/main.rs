use std::process::ExitCode;

use keepalive_agent::{
    cli::{Command, Invocation},
    commands, logs,
};

fn main() -> ExitCode {
    let cli = match Invocation::parse() {
        Invocation::Agent(cli) => cli,
        Invocation::Generate(args) => {
            return match commands::generate::generate(&args) {
                Ok(written) => {
                    for path in written {
                        print(&format!("{}\n", path.display()));
                    }
                    ExitCode::SUCCESS
                }
                Err(error) => fail(&error),
            };
        }
    };
    logs::init(
        cli.log_format.into(),
        cli.log_level.map(keepalive_agent::cli::LogLevel::directive),
    );
    let result = match cli.command {
        Command::Check(args) => commands::check::check(&args).map(|summary| print(&summary)),
        Command::Scan(args) => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            commands::scan::run(&args, &mut out)
                .and_then(|()| std::io::Write::flush(&mut out).map_err(anyhow::Error::from))
        }
        Command::Explain(args) => commands::explain::explain(&args).map(|text| print(&text)),
        Command::Report(args) => commands::report::report(&args).map(|text| print(&text)),
        Command::Status(args) => keepalive_common::host::check()
            .map_err(anyhow::Error::from)
            .and_then(|host| commands::status::collect(&args, &host.cgroup2_mount))
            .and_then(|status| {
                if args.json {
                    print(&commands::status::json(&status)?);
                } else {
                    print(&commands::status::table(&status));
                }
                Ok(())
            }),
        Command::Detach(args) => keepalive_common::host::check()
            .map_err(anyhow::Error::from)
            .and_then(|_| commands::detach::detach(&args))
            .map(|summary| print(&summary)),
        Command::Run(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| runtime.block_on(commands::run::run(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error),
    }
}

#[expect(clippy::print_stdout, reason = "the check's summary is its output")]
fn print(summary: &str) {
    print!("{summary}");
}

#[expect(
    clippy::print_stderr,
    reason = "the error is the program's last word to the user"
)]
fn fail(error: &anyhow::Error) -> ExitCode {
    eprintln!("keepalive-agent: error: {error:#}");
    ExitCode::FAILURE
}
