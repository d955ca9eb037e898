//! Runs the real `ktk dashboard`: bad options exit with status 2 and say why; over a PostgreSQL
//! table it serves the page and the API, answers a missing table with a 503 naming it, refuses
//! a range it does not offer, and stops with status 0 on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn ktk(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ktk")).args(args).env_remove("DATABASE_URL").output().expect("ktk runs")
}

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

#[test]
fn bad_options_exit_with_status_2_and_say_why() {
    let cases: [(&[&str], &str); 5] = [
        (&["dashboard"], "--store"),
        (&["dashboard", "--store", "redis://127.0.0.1:6379"], "unknown scheme"),
        (&["dashboard", "--store", "postgres://127.0.0.1/test", "--table", "events; DROP TABLE x"], "not valid"),
        (&["dashboard", "--store", "postgres://127.0.0.1/test", "--metrics", "ftp://127.0.0.1/metrics"], "http://"),
        (&["dashboard", "--store", "postgres://127.0.0.1/test", "--refresh-ms", "10"], "refresh-ms"),
    ];
    for (args, says) in cases {
        let out = ktk(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?} says {says:?}: {stderr}");
    }
}

/// One HTTP/1.1 GET: the status code and the body.
fn get(address: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).expect("connect to the dashboard");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

#[test]
fn it_serves_the_page_and_the_api_and_stops_on_sigterm() {
    let table = format!("ktk_dash_cli_missing_{}", std::process::id());
    let mut child = Command::new(env!("CARGO_BIN_EXE_ktk"))
        .args(["dashboard", "--store", &database_url(), "--table", &table, "--listen", "127.0.0.1:0"])
        .args(["--title", "cli test"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("ktk dashboard starts");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    let address = loop {
        line.clear();
        assert!(stderr.read_line(&mut line).expect("read stderr") > 0, "ktk dashboard ended before listening");
        if let Some(rest) = line.strip_prefix("ktk dashboard: http://") {
            break rest.split('/').next().expect("an address").to_owned();
        }
    };

    let (status, page) = get(&address, "/");
    assert_eq!(status, 200);
    assert!(page.contains("<title>") && page.contains("/assets/dashboard.js"), "{page}");
    let (status, script) = get(&address, "/assets/dashboard.js");
    assert_eq!(status, 200, "the bundle is built into the binary: {script}");
    let (status, info) = get(&address, "/api/info");
    assert_eq!(status, 200);
    let info: serde_json::Value = serde_json::from_str(&info).expect("JSON");
    assert_eq!(info["title"], "cli test");
    assert_eq!(info["dialect"], "postgres");
    assert!(info["store"].as_str().is_some_and(|s| s.starts_with("postgres://")), "{info}");
    assert!(info["table"].as_str().is_some_and(|t| t.contains(&table)), "{info}");

    // The table does not exist: the store's panels say so, with a 503.
    let (status, body) = get(&address, "/api/audience?range=900");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(&table), "the error names the table: {body}");
    // A range the page does not offer.
    let (status, body) = get(&address, "/api/segments?range=5");
    assert_eq!(status, 400, "{body}");

    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    let status = child.wait().expect("ktk dashboard exits");
    assert_eq!(status.code(), Some(0), "SIGTERM stops it cleanly");
}
