//! `kipctl` in-process, exactly as its thin binary runs it (the library's `Cli` and `run`),
//! against a control plane's admin API: on a thread and a runtime of its own, so a caller
//! whose runtime serves an in-process control plane is not blocked by it.

use std::path::Path;

/// What one `kipctl` run printed.
#[derive(Debug, Clone)]
pub struct Output {
    /// The run succeeded (the binary's exit status 0).
    pub ok: bool,
    pub stdout: String,
    /// What the binary prints on error (`kipctl: error: ...`), empty on success.
    pub stderr: String,
}

/// Runs `kipctl --server SERVER --api-key-file KEY_FILE ARGS`, blocking this thread.
pub fn run_blocking(server: &str, key_file: &Path, args: &[&str]) -> Output {
    let mut argv = vec![
        "kipctl".to_owned(),
        "--server".to_owned(),
        server.to_owned(),
        "--api-key-file".to_owned(),
        key_file.to_str().unwrap().to_owned(),
    ];
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    std::thread::spawn(move || {
        let cli = <::kipctl::Cli as clap::Parser>::try_parse_from(argv).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut out = Vec::new();
        let res = rt.block_on(::kipctl::run(cli, &mut out));
        let stdout = String::from_utf8_lossy(&out).into_owned();
        match res {
            Ok(()) => Output {
                ok: true,
                stdout,
                stderr: String::new(),
            },
            Err(e) => Output {
                ok: false,
                stdout,
                stderr: format!("kipctl: error: {e}\n"),
            },
        }
    })
    .join()
    .unwrap()
}

/// [`run_blocking`] without blocking the caller's runtime.
pub async fn run(server: &str, key_file: &Path, args: &[&str]) -> Output {
    let (server, key_file) = (server.to_owned(), key_file.to_owned());
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_blocking(&server, &key_file, &args)
    })
    .await
    .unwrap()
}
